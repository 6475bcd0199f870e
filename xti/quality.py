"""The demo harness: how good a learned concept is, measured on the demo model with the generator's
own labels. It stands above the library (it trains and generates) and reads the demo's images
(`xti.demo.procedural`).

This module owns the three probes of `bench/quality.py` and their scores:

- **reconstruction**: the training captions ("a <A> on a white background") should give back the
  training images: their shape, colour, the prompted background and, for the giant objects, their
  size class (read with `xti.demo.procedural.measure`), and a small pixel distance to the nearest
  training image with that background (patterns are left to the distance: the demo model does not
  draw them reliably enough at 32 px for `measure` to read them back, even from plain words);
- **editability**: "a blue <A> on a white background" should come out blue, and still be A's shape;
- **mixing**: "a <A> …" with A's vectors in the layers that decide shape and a style concept B's in
  the others should give A's shape in B's colour.

A style concept (one colour over several shapes) has its own probes (`style_probes`): its training
captions for reconstruction, shapes it was never shown for editability.

Everything here is deterministic given the images: tests check the scoring on generator images. The
bench scripts (``bench/quality.py``, ``bench/kde.py``) share the rest of this module: training a demo
concept with a snapshot at every budget (`train_snapshots`), scoring a set of snapshots
(`score_embeddings`), the first budget that reaches a score (`first_budget_reaching`), the learned
vectors against the vocabulary (`vector_stats`), and the markdown table (`SCORES`, `markdown_table`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xti.demo import procedural as P

EDIT_COLOURS: tuple[str, ...] = ("blue", "red", "green", "purple")
"""Colours asked for by the editability probe (named in pretraining, none of them the concept's)."""

DEMO_SHAPE_LAYERS = "IN04-OUT08"
"""Where the demo model decides shape: every layer but the 16x16 ones (IN01, IN02, OUT09-OUT11).

The `coarse` group (the two lowest resolutions: 4x4 and the 2x2 MID at the demo's 16x16 latents) is
too coarse for a 20-pixel cross: with only those layers from the cross and the rest from a style,
neither XTI nor TI drew a single cross (bench/quality.py with ``--mix-layers coarse``), while
the 8x8 layers added give XTI crosses in every sample. On SD 1.5 at 64x64 latents the same objects
span 4x more feature-map pixels, and `coarse` is the usual choice.
"""


DEMO_CONFIGS: dict[str, str] = {
    "striped-cross": "configs/demo.yaml",
    "giant-dotted-diamond": "configs/demo-giant-dotted-diamond.yaml",
    "giant-striped-triangle": "configs/demo-giant-striped-triangle.yaml",
    "teal-dotted": "configs/demo-style.yaml",
}
"""The training config of each demo concept (`xti.demo.procedural.DEMO_CONCEPTS`), relative to the repo."""

CLUTTERED_CONFIG = "configs/demo-cluttered-cross.yaml"
"""The demo's non-square concept with masks (`xti.demo.cluttered`), compared with and without its
masks by ``bench/quality.py --masks``."""

SCORES: dict[str, str] = {
    "recon shape": "reconstruction.shape",
    "recon colour": "reconstruction.colour",
    "recon bg": "reconstruction.background",
    "recon size": "reconstruction.size_class",
    "recon all": "reconstruction.all",
    "recon dist": "reconstruction.distance",
    "edit colour": "editability.colour",
    "edit shape": "editability.shape",
    "mix shape": "mixing.shape",
    "mix colour": "mixing.colour",
    "mix both": "mixing.all",
}
"""Table column -> `evaluate` key, for the bench tables."""


@dataclass(frozen=True)
class Probe:
    """One prompt and what every image sampled from it should show.

    `kind` is ``reconstruction``, ``editability``, ``mixing`` or ``control``; `expect` maps
    attributes of `xti.demo.procedural.Measurement` (shape, colour, background) to the expected value; `mix`
    and `layer_prompts` are passed to `xti.inference.XTIAdapter` (None: not used); `references` are
    the images whose nearest one gives the pixel distance (empty: no distance).
    """

    kind: str
    prompt: str
    expect: Mapping[str, str]
    mix: Mapping[str, str] | None = None
    references: tuple[np.ndarray, ...] = field(default=(), repr=False)
    layer_prompts: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Concept:
    """A demo concept as the probes see it: how prompts name it and what its images show.

    `subject` is the words standing in prompts ("<striped-cross>", or a plain description such as
    "orange striped cross" for a text-only baseline); `images` and `labels` are the training set.
    """

    subject: str
    images: tuple[np.ndarray, ...]
    labels: tuple[P.Label, ...]

    def constant(self, attribute: str) -> str | None:
        """The attribute's value when all training images share it, else None."""
        values = {getattr(lab, attribute) for lab in self.labels}
        return values.pop() if len(values) == 1 else None

    def describe(self) -> str:
        """The shared attributes in words, as pretraining captions put them ("orange striped cross")."""
        caption = P.caption_for(
            self.constant("shape"), self.constant("colour"), None, self.constant("pattern")
        )
        return caption.split(" ", 1)[1]


def load_concept(folder: str | Path, subject: str | None = None) -> Concept:
    """A demo-concept folder (``labels.json`` + images, see `xti.demo.procedural.write_demo_concepts`);
    `subject` defaults to the placeholder ``<concept name>``."""
    folder = Path(folder)
    meta = json.loads((folder / "labels.json").read_text())
    images = tuple(
        np.asarray(Image.open(folder / e["file"]).convert("RGB")) for e in meta["images"]
    )
    labels = tuple(P.Label.from_dict(e) for e in meta["images"])
    return Concept(subject or f"<{meta['concept']}>", images, labels)


def _article(words: str) -> str:
    return "an" if words[:1] in "aeiou" else "a"


def demo_probes(
    obj: Concept,
    style: Concept | None = None,
    *,
    edit_colours: Sequence[str] = EDIT_COLOURS,
    shape_layers: str = DEMO_SHAPE_LAYERS,
) -> list[Probe]:
    """Probes of an object concept `obj` (shape and colour constant in its images), and,
    with a style concept `style` (colour constant), the mixing probes.

    Reconstruction expects the shape, colour and background, and, for an object whose images are
    all of a size pretraining never drew (`xti.demo.procedural.Label.size_class`, e.g. ``giant``), that
    size class too: words cannot ask for it, so it is what shows whether the size was learned.

    `obj.subject` and `style.subject` must be placeholders for mixing to mean anything; with a plain
    description as `obj.subject`, pass no `style`. Mixing puts `obj` in `shape_layers` (any
    `xti.layers` selection) and `style` in all the others.
    """
    shape, colour = obj.constant("shape"), obj.constant("colour")
    if shape is None or colour is None:
        raise ValueError("the object concept's images must share one shape and one colour")
    on_background = {
        bg: f"{_article(obj.subject)} {obj.subject} on a {bg} background" for bg in P.BACKGROUNDS
    }
    size = obj.constant("size_class")
    probes = []
    for bg, prompt in on_background.items():
        refs = tuple(
            img for img, lab in zip(obj.images, obj.labels, strict=True) if lab.background == bg
        )
        expect = {"shape": shape, "colour": colour, "background": bg}
        if size not in (None, "normal"):
            expect["size_class"] = size
        probes.append(Probe("reconstruction", prompt, expect, references=refs or obj.images))
    for c in edit_colours:
        if c == colour:
            continue
        prompt = f"{_article(c)} {c} {obj.subject} on a white background"
        probes.append(Probe("editability", prompt, {"shape": shape, "colour": c}))
    if style is not None:
        style_colour = style.constant("colour")
        if style_colour is None:
            raise ValueError("the style concept's images must share one colour")
        for prompt in on_background.values():
            probes.append(
                Probe(
                    "mixing",
                    prompt,
                    {"shape": shape, "colour": style_colour},
                    # later entries win: the style everywhere, then the object's shape layers
                    mix={style.subject: "all", obj.subject: shape_layers},
                )
            )
    return probes


def style_probes(
    style: Concept,
    obj: Concept | None = None,
    *,
    edit_shapes: Sequence[str] | None = None,
    shape_layers: str = DEMO_SHAPE_LAYERS,
) -> list[Probe]:
    """Probes of a style concept `style` (one colour over several shapes), and, with an object
    concept `obj`, the mixing probes of `demo_probes(obj, style)`.

    - reconstruction: its training captions, ``"a <teal-dotted> star on a black background"``, one
      per distinct (shape, background) of its images: that shape, the style's colour, that
      background; references: the training images with that shape and background;
    - editability: ``"a <teal-dotted> cross on a white background"`` for every shape in
      `edit_shapes` (default: the `xti.demo.procedural.SHAPES` it was never shown): that shape, still in
      the style's colour (the ``colour`` score is the style kept, the ``shape`` score the edit obeyed).
    """
    colour = style.constant("colour")
    if colour is None:
        raise ValueError("the style concept's images must share one colour")
    trained = {lab.shape for lab in style.labels}
    if edit_shapes is None:
        edit_shapes = [s for s in P.SHAPES if s not in trained]
    words = f"{_article(style.subject)} {style.subject}"
    probes = []
    pairs = dict.fromkeys((lab.shape, lab.background) for lab in style.labels)
    for shape, bg in pairs:
        refs = tuple(
            img
            for img, lab in zip(style.images, style.labels, strict=True)
            if (lab.shape, lab.background) == (shape, bg)
        )
        expect = {"shape": shape, "colour": colour, "background": bg}
        probes.append(
            Probe(
                "reconstruction", f"{words} {shape} on a {bg} background", expect, references=refs
            )
        )
    for shape in edit_shapes:
        expect = {"shape": shape, "colour": colour}
        probes.append(Probe("editability", f"{words} {shape} on a white background", expect))
    if obj is not None:
        probes += [
            p
            for p in demo_probes(obj, style, edit_colours=(), shape_layers=shape_layers)
            if p.kind == "mixing"
        ]
    return probes


def mixing_control_probes(
    obj: Concept, style: Concept, word: str, *, shape_layers: str = DEMO_SHAPE_LAYERS
) -> list[Probe]:
    """The mixing probes with a plain `word` (e.g. the style's initializer) instead of the style's
    vectors in the other layers: kind ``control``, expecting the style's colour, which a word that
    does not name it should rarely give. Shows that the mixing colour comes from the style's vectors."""
    probes = []
    for p in demo_probes(obj, style, edit_colours=(), shape_layers=shape_layers):
        if p.kind == "mixing":
            probes.append(
                Probe(
                    "control",
                    p.prompt.replace(obj.subject, word),
                    p.expect,
                    layer_prompts={shape_layers: p.prompt},
                )
            )
    return probes


def cluttered_probes(folder: str | Path = "data/demo-concepts/cluttered-cross") -> list[Probe]:
    """Reconstruction and editability probes of the cluttered concept (`xti.demo.cluttered`): its
    training images are 40x24 scenes with clutter, so the distance is measured to the cross alone,
    centred on a 32x32 canvas of the probe's background (`clean_reference`), not to those images."""
    from xti.demo.cluttered import clean_reference

    concept = load_concept(folder)
    clean = tuple(clean_reference(lab) for lab in concept.labels)
    return demo_probes(Concept(concept.subject, clean, concept.labels))


def image_distance(image: np.ndarray, references: Sequence[np.ndarray]) -> float:
    """Root-mean-square pixel distance (0-1 scale) from `image` to the nearest of `references`."""
    a = image.astype(np.float32) / 255.0
    return min(float(np.sqrt(np.mean((a - r.astype(np.float32) / 255.0) ** 2))) for r in references)


def score_images(images: Sequence[np.ndarray], probe: Probe) -> dict[str, list[float]]:
    """Per-image hits of one probe: ``{attribute: [1.0/0.0, ...]}``, ``all`` (every expected
    attribute at once) and ``distance`` when the probe has references."""
    out: dict[str, list[float]] = {a: [] for a in probe.expect}
    out["all"] = []
    if probe.references:
        out["distance"] = []
    for img in images:
        m = P.measure(img)
        hits = [getattr(m, a) == v for a, v in probe.expect.items()]
        for a, hit in zip(probe.expect, hits, strict=True):
            out[a].append(float(hit))
        out["all"].append(float(all(hits)))
        if probe.references:
            out["distance"].append(image_distance(img, probe.references))
    return out


def evaluate(
    sample: Callable[[Probe], Sequence[np.ndarray]], probes: Sequence[Probe]
) -> dict[str, float]:
    """Mean scores over `probes`, keyed ``"<kind>.<metric>"`` (e.g. ``reconstruction.shape``).

    `sample(probe)` returns the images (uint8 HxWx3) generated for the probe, typically one per seed.
    """
    pooled: dict[str, list[float]] = {}
    for probe in probes:
        for metric, values in score_images(sample(probe), probe).items():
            pooled.setdefault(f"{probe.kind}.{metric}", []).extend(values)
    return {k: float(np.mean(v)) for k, v in pooled.items()}


def adapter_sampler(
    adapter: Any,
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 12,
    guidance_scale: float = 4.0,
) -> Callable[[Probe], list[np.ndarray]]:
    """`evaluate`'s ``sample``: one image per seed from an `xti.inference.XTIAdapter` (one batched
    pipeline call per probe, a seeded generator per image)."""
    import torch

    def sample(probe: Probe) -> list[np.ndarray]:
        out = adapter(
            probe.prompt,
            mix=dict(probe.mix) if probe.mix else None,
            layer_prompts=dict(probe.layer_prompts) if probe.layer_prompts else None,
            num_images_per_prompt=len(seeds),
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
        )
        return [(im * 255).round().astype(np.uint8) for im in out.images]

    return sample


# --------------------------------------------------------------------------------------------------
# Shared by the bench scripts
# --------------------------------------------------------------------------------------------------


def first_budget_reaching(scores: Mapping[int, float | None], threshold: float = 0.9) -> int | None:
    """The smallest budget (step count) whose score is at least `threshold`; None if none is.

    A budget with no score (None, e.g. not measured) never counts. ``first_budget_reaching({10: 0.5,
    25: 0.92, 50: 0.88})`` is 25: the first time it gets there, whatever comes after.
    """
    hits = [b for b, v in scores.items() if v is not None and v >= threshold]
    return min(hits) if hits else None


def vector_stats(vectors: Any, initial: Any, kde: Any) -> dict[str, float]:
    """Where learned vectors sit relative to the KDE reference rows R and to where they started.

    `vectors` is a tensor ``[..., n, d]`` or a mapping of layer name -> ``[n, d]`` (an
    `xti.export.EmbeddingFile`'s ``vectors``); `initial` is ``[n, d]`` (the initializer's vectors,
    broadcast over layers); `kde` is an `xti.kde.KDERegularizer` (``bandwidth``, ``reference_norm``,
    ``nearest``). Returns the means over all vectors of:

    - ``norm_ratio``: ``||v||`` divided by R's mean row norm (1: as long as a typical word);
    - ``nn_over_h``: the distance to the nearest row of R, in bandwidths h;
    - ``moved``: ``||v - initial||`` (absolute; 0 means the vector never left its initializer).
    """
    import torch

    if isinstance(vectors, Mapping):
        vectors = torch.stack([torch.as_tensor(v) for v in vectors.values()])
    v = torch.as_tensor(vectors).detach().float()
    init = torch.as_tensor(initial).detach().float()
    distances, _ = kde.nearest(v, k=1)
    return {
        "norm_ratio": float(v.norm(dim=-1).mean()) / float(kde.reference_norm),
        "nn_over_h": float(distances[..., 0].mean()) / float(kde.bandwidth),
        "moved": float((v - init).norm(dim=-1).mean()),
    }


def format_score(key: str, value: float | None) -> str:
    """A table cell: hit rates in percent, distances and other plain numbers to 3 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if key.endswith(".distance") or "." not in key:
        return f"{value:.3f}"
    return f"{100 * value:.0f}%"


def score_cells(scores: Mapping[str, float], columns: Sequence[str]) -> list[str]:
    """The table cells of `evaluate` scores under the `SCORES` column names `columns`."""
    return [format_score(SCORES[c], scores.get(SCORES[c])) for c in columns]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def train_snapshots(
    config: str | Path,
    budgets: Sequence[int],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    reuse: bool = False,
) -> dict[int, Path]:
    """Train the concept of `config` once up to ``max(budgets)`` steps, with an embedding snapshot
    every gcd(budgets) steps, into `out_dir`; returns the snapshot file of every budget.

    `overrides` are `xti.config.load_config` overrides applied last (e.g. ``xti.granularity=shared``,
    ``kde.weight=0.1``). Validation is off. The schedule is constant after warm-up and every random
    draw of a step depends only on (seed, step), so the snapshot at step k is what a k-step run would
    export. With `reuse`, an `out_dir` that already holds every snapshot is not trained again.
    """
    from xti.config import load_config
    from xti.training import train

    budgets = sorted({int(b) for b in budgets})
    cfg = load_config(
        config,
        [
            f"train.max_steps={budgets[-1]}",
            f"train.snapshot_every={reduce(math.gcd, budgets)}",
            f"output_dir={out_dir}",
            "validation.every=0",
            "validation.mix_with=null",
            "train.overwrite=true",  # a bench run retrains into its own work folder
            *overrides,
        ],
    )
    out = Path(cfg.output_dir)
    files = {
        b: out / "snapshots" / f"{cfg.concept_name}-step{b:06d}.xti.safetensors" for b in budgets
    }
    if not (reuse and all(f.is_file() for f in files.values())):
        t0 = time.perf_counter()
        train(cfg, progress=True)
        print(
            f"  trained {cfg.concept_name} into {out} ({budgets[-1]} steps) in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return files


def score_embeddings(
    pipe: Any,
    embeddings: Mapping[str, str | Path],
    probes: Sequence[Probe],
    seeds: Sequence[int],
    **sampling: Any,
) -> dict[str, float]:
    """`evaluate` the probes with the embedding files `embeddings` (placeholder -> file) loaded into
    an `xti.inference.XTIAdapter` on the pipeline `pipe`; `sampling` goes to `adapter_sampler`."""
    from xti.inference import XTIAdapter

    with XTIAdapter(pipe) as adapter:
        for subject, path in embeddings.items():
            adapter.load(path, subject)
        return evaluate(adapter_sampler(adapter, seeds, **sampling), probes)
