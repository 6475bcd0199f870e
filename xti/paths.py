"""Paths: xti's cache folder, the paths the user names for us to write to (file names, output
folders, output files), and atomic file writes (`atomic_write_bytes`: every file the project writes
goes through it, so none is ever seen half-written).

Every check here runs before anything is loaded or written and fails with one line (`XTIError`)
naming the setting and what to do: a name that is not a plain file name (``../x``, ``/abs``,
``a/b``), an output folder that is a file or cannot be created, an output file that is a folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from xti.errors import XTIError

__all__ = [
    "atomic_tmp_pattern",
    "atomic_write_bytes",
    "cache_dir",
    "check_file_name",
    "check_output_dir",
    "check_output_file",
]


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


# --------------------------------------------------------------------------- atomic writes


_TMP_TOKEN_BYTES = 6


def atomic_tmp_pattern(name_regex: str = r".+") -> re.Pattern[str]:
    """The names `atomic_write_bytes` gives its temporary files (``.<name>.<12 hex>.tmp``) for
    target names matching `name_regex`: what clean-ups of killed writes may remove."""
    return re.compile(rf"^\.{name_regex}\.[0-9a-f]{{{2 * _TMP_TOKEN_BYTES}}}\.tmp$")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` never exists half-written.

    Writes a temporary file in the same directory (created if missing), flushes and fsyncs it, then
    ``os.replace``s it onto ``path``. On any failure the temporary file is removed and the previous
    content of ``path`` (if any) is left untouched. The new file gets the usual umask permissions.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(_TMP_TOKEN_BYTES)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        break
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename durable (not possible on every OS/filesystem)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
