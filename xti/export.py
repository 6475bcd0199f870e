"""The embedding file on disk (DESIGN §6): writing, reading, inspecting and converting it.

This module owns the ``<name>.xti.safetensors`` layout and its metadata (written atomically with
`xti.paths.atomic_write_bytes`), loading of xti files and of
kohya sd-scripts' 16-key SD1 XTI files (pickled ``.pt``/``.bin`` only behind an explicit flag, and
then only with ``weights_only=True``), `inspect_embedding` (``xti inspect``), and the exports
(``xti export``): kohya's 16-key file (`export_kohya`) and the lossy plain textual-inversion file
(`export_ti`).

Layout: the key of one encoder's vectors of one layer is the family's (`xti.families`): SD1.x/SD2.x
files have one key per layer (``IN01`` ... ``OUT11``), SDXL files have ``clip_l.<LAYER>``,
``clip_g.<LAYER>`` and optionally ``clip_g.POOL``; every tensor is ``[n_vectors, d]`` float32.
Every xti file written here also holds each encoder's layer mean under the key plain-embedding
loaders look up (``clip_l`` for SD 1.x, ``clip_h`` for SD 2.x, ``clip_l``/``clip_g`` for SDXL;
`fallback_vectors`), so hosts without an XTI loader read a sensible plain embedding instead of the
first layer; the readers here ignore those keys.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_save

from xti.errors import XTIError
from xti.families import FAMILIES, SD1, ModelFamily, of_file
from xti.paths import atomic_write_bytes, check_output_file, file_name_problem

PathLike = str | os.PathLike[str]

__all__ = [
    "FORMAT_VERSION",
    "SD1_LAYER_NAMES",
    "EmbeddingFile",
    "build_metadata",
    "fallback_vectors",
    "load_embedding_file",
    "save_embedding_file",
    "to_ti_vectors",
]

FORMAT_VERSION = "1"

SD1_LAYER_NAMES: list[str] = [
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
]  # fmt: skip


_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_MAX_KEYS_SHOWN = 20


@dataclass
class EmbeddingFile:
    """A loaded embedding file.

    ``layers`` is in UNet forward order; ``vectors`` maps the file's keys to ``[n, d]`` float32
    tensors (SD1/SD2: ``{"IN01": ...}``; SDXL: ``{"clip_l.IN04": ..., "clip_g.IN04": ...,
    "clip_g.POOL": ...}``); ``metadata`` holds the file's string metadata (empty for kohya files);
    ``source`` is the file it was loaded from (None when built in memory), for messages.
    """

    layers: list[str]
    vectors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    kind: Literal["xti", "kohya"] = "xti"
    source: str | None = None

    @cached_property
    def model_family(self) -> ModelFamily:
        """The `xti.families.ModelFamily` of the file: its metadata, else its key layout (derived
        once, on first use)."""
        return of_file(self.metadata, self.vectors)

    @property
    def family(self) -> str:
        """``sd1``, ``sd2`` or ``sdxl``."""
        return self.model_family.name

    @property
    def n_vectors(self) -> int:
        """Vectors per layer (rows of every tensor)."""
        return next(iter(self.vectors.values())).shape[0]

    def layer_vectors(self, layer: str, encoder: str) -> torch.Tensor:
        """The ``[n, d]`` tensor of one layer for one text encoder (``text``; ``clip_l``/``clip_g``
        for SDXL)."""
        key = self.model_family.file_key(encoder, layer)
        if key not in self.vectors:
            raise XTIError(f"no vectors for {key!r}; keys: {_show_keys(self.vectors)}")
        return self.vectors[key]


# --------------------------------------------------------------------------- metadata


def build_metadata(
    *,
    layers: Sequence[str],
    granularity: str,
    placeholder: str,
    initializer: str,
    n_vectors: int,
    family: str,
    base_model: str,
    text_dims: Mapping[str, int],
    steps: int,
    kde_weight: float,
    title: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The string metadata of an xti file (``xti.*`` and ``modelspec.*``, DESIGN §6).

    ``extra`` adds keys (string values) or overrides ``modelspec.*`` ones (e.g. a more precise
    ``modelspec.architecture``); it may not override ``xti.*`` keys.
    """
    layers = list(layers)
    if not layers or not all(isinstance(x, str) and x for x in layers):
        raise ValueError(f"layers must be a non-empty list of names, got {layers!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer names must be unique, got {layers!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if int(n_vectors) < 1:
        raise ValueError(f"n_vectors must be >= 1, got {n_vectors}")
    dims = {str(k): int(v) for k, v in text_dims.items()}
    meta = {
        "xti.format_version": FORMAT_VERSION,
        "xti.layers": json.dumps(layers),
        "xti.granularity": str(granularity),
        "xti.placeholder": str(placeholder),
        "xti.initializer": str(initializer),
        "xti.n_vectors": str(int(n_vectors)),
        "xti.family": family,
        "xti.base_model": str(base_model),
        "xti.text_dims": json.dumps(dims),
        "xti.steps": str(int(steps)),
        "xti.kde_weight": repr(float(kde_weight)),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": FAMILIES[family].architecture,
        "modelspec.title": title if title is not None else str(placeholder),
        "modelspec.date": _dt.date.today().isoformat(),
    }
    for key, value in (extra or {}).items():
        if key in meta and key.startswith("xti."):
            raise ValueError(f"extra metadata may not override {key!r}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata keys and values must be strings, got {key!r}: {value!r}")
        meta[key] = value
    return meta


# --------------------------------------------------------------------------- writing


def save_embedding_file(
    path: str | os.PathLike[str],
    vectors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
) -> Path:
    """Save ``vectors`` (contiguous float32 copies on CPU) with string ``metadata``, atomically.

    Keys are written in the order of ``xti.layers`` when the metadata has it (then, for SDXL,
    ``clip_l`` before ``clip_g``, and ``POOL`` last); safetensors itself stores keys sorted, so the
    order that loaders rely on is the one in ``xti.layers``. Returns the path written.
    """
    if not vectors:
        raise ValueError("no vectors to save")
    meta: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata keys and values must be strings, got {key!r}: {value!r}")
        meta[key] = value
    tensors: dict[str, torch.Tensor] = {}
    for key in _ordered_keys(vectors, meta):
        t = vectors[key]
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"vectors[{key!r}] must be a 2-D [n, d] tensor, got {shape}")
        # clone: safetensors refuses tensors sharing storage (e.g. views of one [L, n, d] tensor).
        tensors[key] = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    tensors.update(fallback_vectors(tensors, meta))
    data = _safetensors_save(tensors, metadata=meta or None)
    target = Path(path)
    atomic_write_bytes(target, data)
    return target


def fallback_vectors(
    vectors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, torch.Tensor]:
    """The layer-mean fallback tensors an xti file carries for hosts without an XTI loader.

    For each text encoder, the mean over the file's layers (``xti.layers``; not SDXL's POOL) under
    the key that host's plain-embedding loader looks up (`ModelFamily.fallback_key`: ``clip_l``
    for SD 1.x, ``clip_h`` for SD 2.x, ``clip_l`` and ``clip_g`` for SDXL), so that ComfyUI's
    ``embedding:NAME`` (and, for SDXL, A1111 and InvokeAI) read the file as the layer mean instead
    of its first layer. Empty when the metadata names no layers, a layer is missing, or the
    vectors already hold the fallback keys.
    """
    try:
        layers = json.loads(metadata.get("xti.layers", "null"))
    except json.JSONDecodeError:
        return {}
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        return {}
    family = of_file(metadata, vectors)
    out: dict[str, torch.Tensor] = {}
    for enc in family.encoder_names:
        key = family.fallback_key(enc)
        per_layer = [vectors.get(family.file_key(enc, layer)) for layer in layers]
        if key in vectors or any(t is None for t in per_layer):
            return {}
        stack = torch.stack([t.detach().float().cpu() for t in per_layer])  # type: ignore[union-attr]
        out[key] = stack.mean(dim=0).contiguous()
    return out


def _ordered_keys(vectors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> list[str]:
    try:
        layers = json.loads(meta.get("xti.layers", "[]"))
    except json.JSONDecodeError:
        layers = []
    order: list[str] = []
    if isinstance(layers, list) and all(isinstance(x, str) for x in layers):
        required, optional = of_file(meta, vectors).expected_keys(layers)
        order = [k for k in required + optional if k in vectors]
    return order + [k for k in vectors if k not in order]


# --------------------------------------------------------------------------- reading


def load_embedding_file(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> EmbeddingFile:
    """Load an xti file or a kohya 16-key SD1 XTI file.

    safetensors files are recognised by content. Pickled files (``.pt``, ``.bin``, ``.ckpt``,
    ``.pth``) are refused unless ``allow_pickle`` (CLI ``--allow-pickle``); then they are read with
    ``torch.load(weights_only=True)`` and must hold a dict of layer name -> tensor. Every tensor is
    returned as float32 on CPU. Any other layout, and NaN or inf values, raise `XTIError` naming
    the file (and its keys).
    """
    p = Path(path)
    if not p.exists():
        raise XTIError(f"{p}: embedding file not found")
    if not p.is_file():
        raise XTIError(f"{p}: not a file")
    head = _read_head(p)
    if _looks_like_safetensors(head, p.stat().st_size):
        tensors, metadata = _read_safetensors(p)
    elif p.suffix.lower() in _PICKLE_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        tensors, metadata = _read_pickle(p, allow_pickle), {}
    else:
        raise XTIError(f"{p}: not a safetensors file")
    return _interpret(p, tensors, metadata)


def _read_head(p: Path) -> bytes:
    try:
        with p.open("rb") as fh:
            return fh.read(16)
    except OSError as exc:
        raise XTIError(f"{p}: cannot read embedding file ({exc.strerror or exc})") from exc


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: little-endian u64 header length, then a JSON object."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= size - 8


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types (and OSError)
        raise XTIError(f"{p}: not a valid safetensors file ({_one_line(exc)})") from exc
    return tensors, metadata


def _read_pickle(p: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise XTIError(
            f"{p}: pickled file refused (it could run code when loaded); pass allow_pickle=True "
            "(CLI: --allow-pickle) to load it with torch.load(weights_only=True), "
            "or convert it to .safetensors"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and plain containers
        raise XTIError(
            f"{p}: cannot load with weights_only=True (it holds something other than tensors, "
            f"or is not a torch file): {_one_line(exc)}"
        ) from exc
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        found = _show_keys(obj) if isinstance(obj, dict) else type(obj).__name__
        raise XTIError(f"{p}: expected a dict of layer name -> tensor, found {found}")
    return obj


def _interpret(
    p: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> EmbeddingFile:
    version = metadata.get("xti.format_version")
    if version is not None:
        if version != FORMAT_VERSION:
            raise XTIError(
                f"{p}: xti format version {version!r} is not supported (this xti reads "
                f"version {FORMAT_VERSION}); upgrade xti"
            )
        layers = _parse_layers(p, metadata.get("xti.layers"))
        family = of_file(metadata, tensors)
        expected, optional = family.expected_keys(layers)
        kind: Literal["xti", "kohya"] = "xti"
        # the layer-mean fallback keys are for other hosts (`fallback_vectors`): not read here
        tensors = {k: v for k, v in tensors.items() if k not in family.fallback_keys}
    elif set(tensors) - set(SD1.fallback_keys) == set(SD1_LAYER_NAMES):
        tensors = {k: v for k, v in tensors.items() if k in SD1_LAYER_NAMES}
        layers, expected, optional, kind = list(SD1_LAYER_NAMES), list(SD1_LAYER_NAMES), [], "kohya"
    else:
        hint = ""
        if set(tensors) in ({"emb_params"}, {"clip_l", "clip_g"}) or "string_to_param" in tensors:
            hint = " (this looks like a plain textual-inversion embedding, not a per-layer one)"
        raise XTIError(
            f"{p}: not an xti or kohya XTI embedding file{hint}; expected xti metadata or the 16 "
            f"keys {SD1_LAYER_NAMES[0]}..{SD1_LAYER_NAMES[-1]}, found keys: {_show_keys(tensors)}"
        )

    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and k not in optional]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:_MAX_KEYS_SHOWN])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:_MAX_KEYS_SHOWN])}")
        raise XTIError(
            f"{p}: keys do not match the layers in its metadata ({'; '.join(parts)}); "
            f"found keys: {_show_keys(tensors)}"
        )

    ordered = expected + [k for k in optional if k in tensors]
    vectors: dict[str, torch.Tensor] = {}
    for key in ordered:
        t = tensors[key]
        if t.ndim != 2 or not t.is_floating_point():
            raise XTIError(
                f"{p}: {key} must be a 2-D float [n_vectors, dim] tensor, got "
                f"{t.dtype} {tuple(t.shape)}"
            )
        vectors[key] = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not bool(torch.isfinite(vectors[key]).all()):
            raise XTIError(
                f"{p}: {key} holds non-finite values (NaN or inf): the file comes from a diverged "
                "run or is damaged; use another file"
            )
    _check_shapes(p, vectors)
    return EmbeddingFile(
        layers=layers, vectors=vectors, metadata=metadata, kind=kind, source=str(p)
    )


def _parse_layers(p: Path, raw: str | None) -> list[str]:
    try:
        layers = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        layers = None
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(x, str) and x for x in layers)
        or len(set(layers)) != len(layers)
    ):
        raise XTIError(f"{p}: metadata xti.layers must be a JSON list of unique names, got {raw!r}")
    return layers


def _check_shapes(p: Path, vectors: dict[str, torch.Tensor]) -> None:
    rows = {t.shape[0] for t in vectors.values()}
    if len(rows) != 1:
        raise XTIError(f"{p}: layers have different numbers of vectors: {sorted(rows)}")
    widths: dict[str, set[int]] = {}
    for key, t in vectors.items():
        enc = key.split(".", 1)[0] if "." in key else ""
        widths.setdefault(enc, set()).add(t.shape[1])
    for enc, ws in widths.items():
        if len(ws) != 1:
            label = f" for {enc}" if enc else ""
            raise XTIError(f"{p}: layers have different vector widths{label}: {sorted(ws)}")


def _show_keys(obj: Mapping[object, object]) -> str:
    keys = [str(k) for k in obj]
    if not keys:
        return "(none)"
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    more = len(keys) - _MAX_KEYS_SHOWN
    return f"{shown}, ... ({more} more)" if more > 0 else shown


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- plain TI export


def to_ti_vectors(
    ef: EmbeddingFile, *, layer: str | None = None, mean: bool = False
) -> dict[str, torch.Tensor]:
    """Collapse per-layer vectors to one plain textual-inversion embedding (lossy).

    Exactly one of ``layer`` (take that layer's vectors) or ``mean`` (average over all layers) is
    given. SD1/SD2 -> ``{"emb_params": [n, d]}``, the single-key layout that A1111, ComfyUI and
    kohya write and diffusers' ``load_textual_inversion`` accepts; SDXL ->
    ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``. The ``POOL`` slot is not used. Tensors are new
    float32 CPU tensors.
    """
    if (layer is None) == (not mean):
        raise XTIError(
            "plain-TI export needs exactly one of: a layer name, or the mean over layers"
        )
    if layer is not None and layer not in ef.layers:
        raise XTIError(f"unknown layer {layer!r}; layers in this file: {', '.join(ef.layers)}")
    chosen = ef.layers if mean else [layer]
    family = ef.model_family
    out: dict[str, torch.Tensor] = {}
    for enc in family.encoder_names:
        stack = torch.stack([ef.layer_vectors(name, enc).float() for name in chosen])
        out[family.ti_key(enc)] = stack.mean(dim=0).cpu().contiguous().clone()
    return out


# --------------------------------------------------------------------------- inspect and export


def inspect_embedding(
    path: PathLike,
    *,
    model: str | None = None,
    allow_pickle: bool = False,
    top_k: int = 1,
    model_config: str | None = None,
) -> dict[str, Any]:
    """Describe an embedding file as JSON-ready data.

    Keys: ``file``, ``kind`` (xti/kohya), ``family``, ``placeholder``, ``n_vectors``, ``layers``,
    ``shapes`` and ``norms`` (L2 norm of each vector, per key), ``metadata``; with ``model``
    (a folder, ``builtin:`` name or hub id) also ``nearest_tokens``: per key, for each vector, the
    ``top_k`` nearest vocabulary tokens (Euclidean, special tokens excluded). ``model`` may be
    any model path (`xti.models.resolve_model_path`); a single file's config is `model_config`.
    """
    ef = load_embedding_file(path, allow_pickle=allow_pickle)
    info: dict[str, Any] = {
        "file": str(path),
        "kind": ef.kind,
        "family": ef.family,
        "placeholder": ef.metadata.get("xti.placeholder"),
        "n_vectors": ef.n_vectors,
        "layers": list(ef.layers),
        "shapes": {k: list(v.shape) for k, v in ef.vectors.items()},
        "norms": {k: [round(float(x), 6) for x in v.norm(dim=-1)] for k, v in ef.vectors.items()},
        "metadata": _decoded_metadata(ef.metadata),
    }
    if model is not None:
        info["model"] = model
        info["nearest_tokens"] = _nearest_tokens(ef, str(path), model, top_k, model_config)
    return info


def _decoded_metadata(metadata: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in ("xti.layers", "xti.text_dims"):
            try:
                out[key] = json.loads(value)
                continue
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def _nearest_tokens(
    ef: EmbeddingFile, where: str, model: str, top_k: int, model_config: str | None = None
) -> dict[str, Any]:
    from xti.kde import KDERegularizer
    from xti.models import load_text_encoder

    family = ef.model_family
    out: dict[str, Any] = {}
    for spec in family.specs:
        keys = [k for layer in ef.layers if (k := family.file_key(spec.name, layer)) in ef.vectors]
        keys += [k for k in ef.vectors if k not in keys and k.startswith(f"{spec.name}.")]
        tokenizer, text_encoder = load_text_encoder(model, spec, model_config)
        weight = text_encoder.get_input_embeddings().weight.detach().float()
        width = weight.shape[-1]
        file_width = ef.vectors[keys[0]].shape[-1]
        if file_width != width:
            raise XTIError(
                f"{where}: its {spec.name} vectors are {file_width} wide but the "
                f"{spec.text_encoder} of {model} takes {width}-wide token embeddings"
            )
        special = [i for i in tokenizer.all_special_ids if 0 <= i < weight.shape[0]]
        kde = KDERegularizer.from_embedding(weight, special, bandwidth=1.0)
        k = max(1, min(int(top_k), kde.n))
        for key in keys:
            _, idx = kde.nearest(ef.vectors[key].float(), k=k)
            out[key] = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in idx]
    return out


def _save_safetensors(
    path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> Path:
    from safetensors.torch import save

    data = save(
        {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()},
        metadata=dict(metadata) if metadata else None,
    )
    target = Path(path)
    atomic_write_bytes(target, data)
    return target


def _default_output(source: Path, suffix: str) -> Path:
    name = source.name
    for ext in (".xti.safetensors", ".safetensors", ".pt", ".bin", ".pth", ".ckpt"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    problem = file_name_problem(f"{name}{suffix}")
    if problem:  # e.g. a layer named "../x" in the file
        raise XTIError(
            f"{source}: the default output name {name + suffix!r} {problem}; pass --output"
        )
    return source.with_name(f"{name}{suffix}")


def _check_output(source: Path, out: Path) -> None:
    check_output_file(out, "--output")
    if out.resolve() == source.resolve():
        raise XTIError(f"{out}: the output would overwrite the input file; pass another --output")


def kohya_keys(ef: EmbeddingFile) -> dict[str, str] | None:
    """For each of the 16 kohya names, the file's key that holds it, when the file's layers map one
    to one onto them: SD 1.x/2.x block layers, or transformer layers (``IN01.0``) of a UNet with
    one transformer block per layer. None otherwise."""
    if ef.model_family.specs != SD1.specs:
        return None
    if sorted(ef.layers) == sorted(SD1_LAYER_NAMES):
        return {name: ef.model_family.file_key("text", name) for name in SD1_LAYER_NAMES}
    if sorted(ef.layers) == sorted(f"{name}.0" for name in SD1_LAYER_NAMES):
        return {name: ef.model_family.file_key("text", f"{name}.0") for name in SD1_LAYER_NAMES}
    return None


def export_kohya(
    path: PathLike, output: PathLike | None = None, *, allow_pickle: bool = False
) -> Path:
    """Write the 16-key layout kohya's sd-scripts read (``IN01`` ... ``OUT11``, no metadata) from
    any file whose layers map one to one onto them (`kohya_keys`).

    Default output: ``<name>.kohya.safetensors`` beside the input.
    """
    source = Path(path)
    ef = load_embedding_file(source, allow_pickle=allow_pickle)
    keys = kohya_keys(ef)
    if keys is None:
        raise XTIError(
            f"{source}: kohya's XTI files hold the 16 SD 1.x/2.x layers "
            f"({names_list(SD1_LAYER_NAMES)}); this file has {names_list(list(ef.vectors))}"
        )
    out = Path(output) if output is not None else _default_output(source, ".kohya.safetensors")
    _check_output(source, out)
    return _save_safetensors(out, {k: ef.vectors[keys[k]] for k in SD1_LAYER_NAMES}, None)


def export_ti(
    path: PathLike,
    output: PathLike | None = None,
    *,
    layer: str | None = None,
    mean: bool = False,
    allow_pickle: bool = False,
) -> Path:
    """Write a plain textual-inversion file from one layer or the mean over layers (lossy).

    SD 1.x/2.x: ``{"emb_params": [n, d]}`` (A1111, ComfyUI, diffusers ``load_textual_inversion``);
    SDXL: ``{"clip_l": ..., "clip_g": ...}``. Default output beside the input:
    ``<name>-<LAYER|mean>.ti.safetensors``.
    """
    source = Path(path)
    ef = load_embedding_file(source, allow_pickle=allow_pickle)
    vectors = to_ti_vectors(ef, layer=layer, mean=mean)
    which = layer if layer is not None else "mean"
    out = (
        Path(output) if output is not None else _default_output(source, f"-{which}.ti.safetensors")
    )
    _check_output(source, out)
    meta = {"xti.exported_from": source.name, "xti.export": "mean" if mean else f"layer {layer}"}
    if "xti.placeholder" in ef.metadata:
        meta["xti.placeholder"] = ef.metadata["xti.placeholder"]
    return _save_safetensors(out, vectors, meta)


def names_list(names: Sequence[str], limit: int = _MAX_KEYS_SHOWN) -> str:
    """Names for a message: all of them, or the first and last few of a long list."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:8])}, ... {', '.join(names[-4:])} ({len(names)} layers)"
