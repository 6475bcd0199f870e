"""The Inspect tab's work: what an embedding file holds, as numbers and pictures.

`describe` is `xti.export.inspect_embedding` (metadata, per-vector norms, nearest vocabulary
tokens with a model); `norm_chart` plots the mean vector norm per layer (one series per text
encoder), `similarity` the cosine similarity between every two layers' vectors (all vectors of a
layer, all encoders, as one long vector), and `sweep_command` is the ``xti sweep`` command that
writes the sweep the tab shows.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np

from xti.export import EmbeddingFile
from xti.ui.plots import bar_chart, heatmap


def layer_vectors(ef: EmbeddingFile) -> np.ndarray:
    """``[L, n·d (all encoders)]``: each layer's vectors as one row, in the file's layer order."""
    family = ef.model_family
    rows = []
    for layer in ef.layers:
        parts = [ef.layer_vectors(layer, enc).flatten() for enc in family.encoder_names]
        rows.append(np.concatenate([p.numpy() for p in parts]))
    return np.stack(rows).astype(np.float64)


def cosine_matrix(rows: np.ndarray) -> np.ndarray:
    """Cosine similarity of every two rows (0 where a row is all zeros)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    unit = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    return unit @ unit.T


def norm_chart(ef: EmbeddingFile) -> Any:
    """Bars of the mean vector norm per layer, one series per text encoder."""
    family = ef.model_family
    series = {
        enc: [float(ef.layer_vectors(layer, enc).norm(dim=-1).mean()) for layer in ef.layers]
        for enc in family.encoder_names
    }
    return bar_chart(ef.layers, series, "vector norm per layer (mean over vectors)")


def similarity(ef: EmbeddingFile) -> Any:
    """The heat map of cosine similarities between layers."""
    return heatmap(ef.layers, cosine_matrix(layer_vectors(ef)), "cosine similarity between layers")


def nearest_rows(info: dict[str, Any]) -> list[list[str]]:
    """``[key, tokens of vector 0 | tokens of vector 1 | …]`` rows from `describe`'s output."""
    rows = []
    for key, per_vector in (info.get("nearest_tokens") or {}).items():
        text = " | ".join(", ".join(t.replace("</w>", "") for t in tokens) for tokens in per_vector)
        rows.append([key, text])
    return rows


def describe(path: str, model: str | None, top_k: int = 3) -> dict[str, Any]:
    """`xti.export.inspect_embedding` with the nearest tokens when a model is given."""
    from xti.export import inspect_embedding

    return inspect_embedding(path, model=model or None, top_k=max(1, int(top_k)))


def default_prompt(placeholder: str, model: str) -> str:
    """A sweep prompt the model understands (the demo model knows only its captions' words)."""
    if "demo-model" in model:
        return f"a {placeholder} on a white background"
    return f"a photo of {placeholder}"


def sweep_command(
    *,
    file: str,
    model: str,
    prompt: str,
    kind: str,
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    neutral: str | None,
    window: int = 1,
    out: str | None = None,
) -> str:
    """The ``xti sweep`` command that writes this sweep as one PNG."""
    args = ["xti", "sweep", file, "--model", model, "--prompt", prompt, "--kind", kind]
    if kind == "sliding" and window != 1:
        args += ["--window", str(window)]
    if neutral is not None:
        args += ["--neutral", neutral]
    args += ["--seeds", *[str(s) for s in seeds], "--steps", str(steps)]
    args += ["--guidance", f"{guidance:g}"]
    if out:
        args += ["--out", out]
    return " ".join(shlex.quote(a) for a in args)
