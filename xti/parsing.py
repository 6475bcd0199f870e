"""Parsers of the small text formats users type, shared by the CLI (`xti.cli`) and the web UI
(`xti.ui`): embedding entries (``FILE`` or ``<token>=FILE``), image sizes (``512`` or ``512x768``)
and ``KEY=VALUE`` assignments. Each problem is one line (`XTIError`) naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from xti.errors import XTIError


def embedding_args(items: list[str]) -> list[tuple[str | None, str]]:
    """``--embedding PATH`` or ``--embedding '<tok>=PATH'`` → (placeholder or None, path)."""
    out: list[tuple[str | None, str]] = []
    for item in items:
        placeholder, sep, path = item.partition("=")
        if sep and not os.path.exists(item) and placeholder.strip() and path.strip():
            out.append((placeholder.strip(), path.strip()))
        else:
            out.append((None, item))
    return out


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """``--size N`` or ``WxH`` → (width, height), multiples of 8 (None, None when not given)."""
    if text is None:
        return None, None
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h if sep else w)
    except ValueError:
        raise XTIError(f"--size: expected N or WxH (e.g. 512 or 512x768), got {text!r}") from None
    if width < 8 or height < 8:
        raise XTIError(f"--size: {text!r} is too small")
    if width % 8 or height % 8:
        raise XTIError(f"--size: {text!r}: width and height must be multiples of 8 (e.g. 512, 768)")
    if width > 8192 or height > 8192:
        raise XTIError(f"--size: {text!r} is too large (at most 8192 per side)")
    return width, height


def parse_assignments(items: Iterable[str], what: str, *, split_last: bool) -> dict[str, str]:
    """Parse ``KEY=VALUE`` command-line items in order (``--mix "<a>=coarse"``,
    ``--layer-prompt "mid=a green lizard"``); ``split_last`` splits at the last ``=``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.rpartition("=") if split_last else item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise XTIError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out
