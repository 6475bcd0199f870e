"""Paths: xti's cache folder, and the paths the user names for us to write to (file names, output
folders, output files).

Every check here runs before anything is loaded or written and fails with one line (`XTIError`)
naming the setting and what to do: a name that is not a plain file name (``../x``, ``/abs``,
``a/b``), an output folder that is a file or cannot be created, an output file that is a folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from xti.errors import XTIError

__all__ = ["cache_dir", "check_file_name", "check_output_dir", "check_output_file"]


def cache_dir() -> Path:
    """The xti cache folder (built models, latents): ``$XTI_CACHE`` or ``~/.cache/xti``."""
    return Path(os.environ.get("XTI_CACHE") or Path.home() / ".cache" / "xti").expanduser()


def file_name_problem(name: str) -> str | None:
    """Why `name` is not a plain file name (None when it is)."""
    if not name or not name.strip():
        return "must not be empty"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return "must be a file name, without path separators"
    if name in (".", "..") or ".." in name:
        return "must not contain '..'"
    if name.startswith("-"):
        return "must not start with '-'"
    if any(ord(c) < 32 for c in name):
        return "must not contain control characters"
    return None


def check_file_name(name: str, what: str) -> str:
    """Return `name` when it is a plain file name, else raise naming `what` (e.g. ``--name``)."""
    problem = file_name_problem(name)
    if problem:
        raise XTIError(f"{what}={name!r} {problem} (e.g. my-concept); it names files in the folder")
    return name


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Check that `path` is a folder or can be created as one (nothing is left behind: an empty
    probe folder is made and removed in the nearest existing folder, since permission bits do not
    tell, e.g. for root under ``/proc``).

    Raises:
        XTIError: the path or one of its parents is a file, or the nearest existing parent is not
            writable.
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise XTIError(f"{what} {p} is a file, not a folder; choose a folder")
    existing = _nearest_existing(p.absolute())
    if not existing.is_dir():
        raise XTIError(f"{what} {p} cannot be created: {existing} is a file; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise XTIError(f"{what} {p} cannot be created or written: {existing} is not writable")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".xti-probe-", dir=existing))
    except OSError as err:
        raise XTIError(
            f"{what} {p} cannot be created or written: making a folder in {existing} fails "
            f"({err.strerror or err}); choose another folder"
        ) from None
    return p


def check_output_file(path: str | os.PathLike[str], what: str) -> Path:
    """Check that `path` can be written as a file: not a folder, its folder creatable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise XTIError(f"{what} {p} is a folder; give a file name (e.g. {p / 'out.safetensors'})")
    check_output_dir(p.parent if str(p.parent) else Path("."), f"{what} folder")
    return p
