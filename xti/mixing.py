"""Style mixing and layer matching as pure functions (no diffusers, no model): shared by
`xti.inference`, the CLI and the ComfyUI node pack (``comfyui/xti_nodes``).

This module owns which layers each mixed placeholder owns (`mix_owners`), how a prompt is rewritten
for one layer of a mix (`fill_mix`), and which of a file's layers feeds each layer of a scheme
(`match_layers`); the ``KEY=VALUE`` syntax users type is `xti.parsing.parse_assignments`.
Mixing rule: in the layers given for a concept, every placeholder of the mix in the prompt is
filled by that concept; layers not given keep the placeholder as written; later entries win.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from xti.errors import XTIError
from xti.layers import LayerScheme

Selection = str | Sequence[str]
"""A layer selection: names, groups, ranges (``"coarse"``, ``"IN07-OUT05"``, ``["MID", "0-3"]``)."""

__all__ = [
    "Selection",
    "fill_mix",
    "match_layers",
    "mix_owners",
    "placeholder_regex",
]


def placeholder_regex(placeholders: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of the placeholders (longest first); None for none."""
    items = sorted(set(placeholders), key=len, reverse=True)
    return re.compile("|".join(re.escape(p) for p in items)) if items else None


def mix_owners(
    scheme: LayerScheme, mix: Mapping[str, Selection], loaded: Iterable[str]
) -> dict[int, str]:
    """For each layer index a mix selects, the placeholder that owns it (later entries win).

    Raises `XTIError` for a placeholder that is not loaded or a selection that selects nothing.
    """
    known = list(loaded)
    owner: dict[int, str] = {}
    for placeholder, selection in mix.items():
        if placeholder not in known:
            raise XTIError(
                f"mix: {placeholder!r} is not a loaded concept (loaded: {', '.join(known) or 'none'})"
            )
        spec = list(selection) if isinstance(selection, (tuple, list)) else str(selection)
        indices = scheme.select(spec)
        if not indices:
            raise XTIError(f"mix: {placeholder}={selection!r} selects no layer")
        for i in indices:
            owner[i] = placeholder
    return owner


def fill_mix(text: str, owner: str | None, pattern: re.Pattern[str] | None) -> str:
    """The text one layer sees: every mixed placeholder replaced by the layer's owner (unchanged
    when the layer has no owner)."""
    if owner is None or pattern is None:
        return text
    return pattern.sub(lambda _m: owner, text)


def match_layers(file_layers: Sequence[str], scheme: LayerScheme) -> list[str] | None:
    """For each layer of the scheme, the file's layer that holds its vectors; None when the file
    does not fit.

    A file fits when its layers are the scheme's; or, on a ``block`` scheme whose layers have one
    transformer block each, the transformer names (``IN01.0``); or, on a ``transformer`` scheme,
    the block names (each transformer block takes its block's vectors).
    """
    names = scheme.names
    given = set(file_layers)
    if len(given) != len(file_layers):
        return None
    if given == set(names):
        return list(names)
    if scheme.granularity == "block":
        if all(len(layer.cross_attention_paths) == 1 for layer in scheme.layers):
            dotted = [f"{n}.0" for n in names]
            if given == set(dotted):
                return dotted
        return None
    blocks = [n.rsplit(".", 1)[0] for n in names]
    return blocks if given == set(blocks) else None
