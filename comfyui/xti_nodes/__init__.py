"""xti's ComfyUI node pack: per-layer (XTI / P+) embeddings in ComfyUI graphs.

Install by linking (or copying) this folder into ComfyUI's ``custom_nodes/``. The nodes use the
``xti`` package for reading files and layer selections; when it is not installed in ComfyUI's
Python, it is taken from the repository this folder lives in (links are followed). Nothing here
imports diffusers at load time.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("xti") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
