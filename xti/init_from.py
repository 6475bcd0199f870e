"""Starting a run from an existing embedding (``concept.init_from``).

This module owns reading a start file and turning it into a run's initial vectors. Three layouts
are read, all from safetensors only (a pickled file is refused, never unpickled):

* an **xti file** (DESIGN §6): one ``[n, d]`` tensor per layer (SDXL: per encoder, and the
  optional ``clip_g.POOL``), read by `xti.export.load_embedding_file`;
* a **kohya XTI file**: the 16 SD 1.x/2.x keys ``IN01`` … ``OUT11`` without metadata (what
  ``xti export --format kohya`` and kohya's sd-scripts write);
* a **plain textual-inversion file**: A1111's ``emb_params`` (or ``string_to_param.*``), diffusers'
  ``learned_embeds.safetensors`` (``{token: [n, d] or [d]}``), ``clip_l``/``clip_h`` for SD 1.x/2.x,
  or SDXL's ``{"clip_l": …, "clip_g": …}``; its one vector set is copied to every layer (and to
  SDXL's POOL slot).

Against the model: each encoder's width, the layer names (a per-layer file must have exactly the
model's layers at the run's granularity) and ``n_vectors`` are checked, each with a one-line
`XTIError` naming the file and the fix. With ``xti.granularity=shared`` a per-layer file gives its
layers' mean (its layer vectors when they are all equal).

A run started from a file is a *new* run: step 0, a fresh optimizer and learning-rate schedule
(unlike ``train.resume``, which continues a run's optimizer state). The source (path, sha256,
layout) goes into the exported file's metadata (``xti.init_from``, JSON) and into the model card.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from xti.errors import XTIError
from xti.export import SD1_LAYER_NAMES, EmbeddingFile, load_embedding_file, names_list
from xti.families import POOL, ModelFamily

METADATA_KEY = "xti.init_from"
_PLAIN_ALIASES = ("emb_params", "clip_l", "clip_h")  # one-encoder plain-TI keys


@dataclass(frozen=True)
class InitSource:
    """Where a run's start vectors came from: recorded in its file's metadata and model card."""

    path: str
    sha256: str
    layout: str  # "xti", "kohya" or "ti"

    def metadata(self) -> dict[str, str]:
        """The exported file's ``xti.init_from`` entry."""
        return {METADATA_KEY: json.dumps(self.as_dict())}

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "layout": self.layout}


@dataclass(frozen=True)
class InitTarget:
    """What the start vectors must fit: the model's family, each encoder's width, the layers, the
    run's vector sets."""

    family: ModelFamily
    widths: Mapping[str, int]  # per encoder name
    layer_names: Sequence[str]
    variant_of_layer: torch.Tensor  # [L] the vector set each layer reads
    num_variants: int
    pooled: str
    n_vectors: int


@dataclass
class InitVectors:
    """A run's start vectors: per encoder ``[S, n, d]`` (S = its vector sets, POOL included)."""

    source: InitSource
    vectors: dict[str, torch.Tensor]

    def copy_into(self, sets: Mapping[str, torch.nn.Module]) -> None:
        """Overwrite each encoder's trainable vectors (``sets[name].vectors``) in place."""
        with torch.no_grad():
            for name, start in self.vectors.items():
                sets[name].vectors.copy_(start)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_init_from(path: str | Path, target: InitTarget) -> InitVectors:
    """Read `path` (any layout this module knows) and return start vectors that fit `target`.

    Raises:
        XTIError: a missing, pickled or unreadable file, or one that does not fit the model.
    """
    p = Path(path).expanduser()
    tensors, metadata = _read(p)
    per_layer = "xti.format_version" in metadata or set(SD1_LAYER_NAMES) <= set(tensors)
    if per_layer:
        ef = load_embedding_file(p)  # checks keys, shapes, finiteness
        vectors = _from_per_layer(p, ef, target)
        layout = ef.kind
    else:
        vectors = _from_plain(p, tensors, target)
        layout = "ti"
    return InitVectors(InitSource(str(p), sha256_of(p), layout), vectors)


def _read(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not p.is_file():
        raise XTIError(f"concept.init_from: {p} not found (give an existing .safetensors file)")
    with p.open("rb") as fh:
        head = fh.read(9)
    size = p.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] != b"{" or not 0 < n <= size - 8:
        raise XTIError(
            f"concept.init_from: {p} is not a safetensors file (pickled .pt/.bin files are never "
            "loaded here); convert it to .safetensors"
        )
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise XTIError(f"concept.init_from: {p} is not a valid safetensors file ({exc})") from None


def _check_fit(p: Path, encoder: str, t: torch.Tensor, target: InitTarget) -> None:
    """Width and n_vectors of one encoder's ``[n, d]`` vectors against the model and the concept."""
    width = target.widths[encoder]
    if t.shape[-1] != width:
        raise XTIError(
            f"concept.init_from: {p} holds {t.shape[-1]}-wide vectors for the {encoder} text "
            f"encoder, this {target.family.label} model's is {width} wide; use an embedding "
            "trained for this model family"
        )
    if t.shape[0] != target.n_vectors:
        raise XTIError(
            f"concept.init_from: {p} holds {t.shape[0]} vector(s) per layer, concept.n_vectors is "
            f"{target.n_vectors}; set concept.n_vectors={t.shape[0]}"
        )


def _from_per_layer(p: Path, ef: EmbeddingFile, target: InitTarget) -> dict[str, torch.Tensor]:
    """Per encoder ``[S, n, d]`` from an xti or kohya file whose layers are the model's."""
    family = target.family
    if ef.model_family.encoder_names != family.encoder_names:
        raise XTIError(
            f"concept.init_from: {p} is a {ef.model_family.label} embedding, the model is "
            f"{family.label}; use an embedding trained for this model family"
        )
    if sorted(ef.layers) != sorted(target.layer_names):
        gran = ef.metadata.get("xti.granularity")
        hint = f" (the file was trained with xti.granularity={gran})" if gran else ""
        raise XTIError(
            f"concept.init_from: {p} has the layers {names_list(ef.layers)}, this model has "
            f"{names_list(list(target.layer_names))}{hint}; use a file from a model with this "
            "UNet layout, or a plain TI file"
        )
    out = {}
    for enc in family.encoder_names:
        per_layer = torch.stack([ef.layer_vectors(layer, enc) for layer in target.layer_names])
        _check_fit(p, enc, per_layer[0], target)
        sets = _layer_sets(per_layer, target)
        extra = family.vector_sets(enc, target.num_variants, target.pooled) - target.num_variants
        if extra:  # SDXL's POOL slot: the file's, else the layer mean
            key = family.file_key(enc, POOL)
            pool = ef.vectors[key] if key in ef.vectors else per_layer.mean(0)
            sets = torch.cat([sets, pool.unsqueeze(0).expand(extra, -1, -1)])
        out[enc] = sets.float().clone()
    return out


def _layer_sets(per_layer: torch.Tensor, target: InitTarget) -> torch.Tensor:
    """``[V, n, d]``: each vector set from the layers that read it (their mean when they differ)."""
    sets = []
    for v in range(target.num_variants):
        rows = per_layer[target.variant_of_layer == v]
        same = bool((rows == rows[0:1]).all())
        sets.append(rows[0] if same else rows.mean(0))
    return torch.stack(sets)


def _from_plain(
    p: Path, tensors: Mapping[str, torch.Tensor], target: InitTarget
) -> dict[str, torch.Tensor]:
    """Per encoder ``[S, n, d]``: the plain file's one vector set copied to every set."""
    family = target.family
    found = _plain_vectors(p, tensors, family.encoder_names)
    out = {}
    for enc, t in found.items():
        t = t.detach().float().cpu()
        t = t.unsqueeze(0) if t.ndim == 1 else t
        if t.ndim != 2:
            raise XTIError(
                f"concept.init_from: {p}: the {enc} vectors must be [n_vectors, dim], got "
                f"{tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise XTIError(f"concept.init_from: {p} holds non-finite values; use another file")
        _check_fit(p, enc, t, target)
        sets = family.vector_sets(enc, target.num_variants, target.pooled)
        out[enc] = t.unsqueeze(0).repeat(sets, 1, 1).contiguous()
    return out


def _plain_vectors(
    p: Path, tensors: Mapping[str, torch.Tensor], encoders: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Pick each encoder's tensor of a plain TI file (one-line error naming the keys otherwise)."""
    keys = ", ".join(list(tensors)[:8]) or "(none)"
    if len(encoders) > 1:  # SDXL: one tensor per encoder, under its name
        missing = [e for e in encoders if e not in tensors]
        if missing:
            raise XTIError(
                f"concept.init_from: {p} is not an SDXL embedding (needs {' and '.join(encoders)} "
                f"keys, found {keys}); use an SDXL xti file or plain TI file"
            )
        return {e: tensors[e] for e in encoders}
    if "clip_g" in tensors:
        raise XTIError(
            f"concept.init_from: {p} is an SDXL embedding (keys {keys}), the model is SD 1.x/2.x; "
            "use an embedding trained for this model family"
        )
    named = [k for k in tensors if k in _PLAIN_ALIASES or k.startswith("string_to_param")]
    if len(named) == 1:
        return {encoders[0]: tensors[named[0]]}
    if len(tensors) == 1:  # diffusers' learned_embeds: {token: tensor}
        return {encoders[0]: next(iter(tensors.values()))}
    raise XTIError(
        f"concept.init_from: {p} is not an embedding xti can start from (keys {keys}); give an "
        "xti file, a kohya XTI file or a plain TI file (emb_params, or one {token: tensor})"
    )
