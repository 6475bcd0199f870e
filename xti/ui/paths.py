"""Paths in the web UI: the demo defaults, and the checks on every path a user types.

The UI only reads and writes the files and folders the user names in its fields (models, image
folders, embedding files, output folders); each is checked here first and a problem is one line
(`XTIError`). Images reach the browser as pictures the server made (Gradio keeps copies in its own
cache), never as links to files on disk, so the server serves nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xti.errors import XTIError

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The source checkout (``data/`` and ``configs/`` live there in an editable install)."""


def shown(path: str | os.PathLike[str]) -> str:
    """`path` as the UI shows it in commands: relative to the working folder when inside it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


@dataclass(frozen=True)
class Defaults:
    """What the fields hold when the page opens: the demo model and concept when the checkout
    has them (``data/demo-model``, configs/demo.yaml), else the built-in tiny model."""

    model: str
    config: str
    images: str
    placeholder: str
    initializer: str
    style: str
    output_dir: str

    @classmethod
    def find(cls, model: str | None = None) -> Defaults:
        """The demo defaults (``model`` replaces the demo model when given)."""
        demo = REPO_ROOT / "data" / "demo-model"
        has_demo = (demo / "model_index.json").is_file()
        return cls(
            model=model or (shown(demo) if has_demo else "builtin:tiny-sd1"),
            config=shown(REPO_ROOT / "configs" / ("demo.yaml" if has_demo else "tiny.yaml")),
            images=shown(REPO_ROOT / "data" / "demo-concepts" / "striped-cross"),
            placeholder="<striped-cross>",
            initializer="cross",
            style=shown(REPO_ROOT / "data" / "demo-concepts" / "teal-dotted.xti.safetensors"),
            output_dir=os.path.join("outputs", "ui"),
        )


def _typed(text: str | None, what: str) -> Path:
    """The path typed into field `what`, with ``~`` expanded; empty is an error."""
    if text is None or not str(text).strip():
        raise XTIError(f"{what}: give a path")
    return Path(str(text).strip()).expanduser()


def existing_dir(text: str | None, what: str) -> Path:
    """A folder that must exist."""
    p = _typed(text, what)
    if not p.exists():
        raise XTIError(f"{what}: {p} does not exist")
    if not p.is_dir():
        raise XTIError(f"{what}: {p} is not a folder")
    return p


def existing_file(text: str | None, what: str) -> Path:
    """A file that must exist."""
    p = _typed(text, what)
    if not p.exists():
        raise XTIError(f"{what}: {p} does not exist")
    if not p.is_file():
        raise XTIError(f"{what}: {p} is not a file")
    return p


def embedding_entries(text: str | None, what: str) -> list[tuple[str | None, str]]:
    """Embedding files, one per line, as ``xti generate -e`` takes them: ``FILE`` (its own
    placeholder) or ``<token>=FILE`` (another placeholder); each must exist; at least one."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    if not lines:
        raise XTIError(f"{what}: give at least one file, one per line")
    from xti.parsing import embedding_args

    return [(token, str(existing_file(path, what))) for token, path in embedding_args(lines)]


def entry_text(entry: tuple[str | None, str]) -> str:
    """An entry of `embedding_entries` as typed (``FILE`` or ``<token>=FILE``)."""
    placeholder, path = entry
    return f"{placeholder}={path}" if placeholder else path


def model_path(text: str | None) -> str:
    """A model as typed: ``builtin:…``, an existing folder or single file, or a hub id (checked by
    the library's resolver, `xti.models.resolve_model_path`, without building anything)."""
    from xti.models import resolve_model_path

    value = str(text or "").strip()
    if not value:
        raise XTIError("model: give a diffusers folder, a single .safetensors file or builtin:…")
    return resolve_model_path(value, build=False, what="model:").shown
