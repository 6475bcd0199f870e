"""The locked dependency set (``requirements.lock``) and the check against the newest releases.

    python scripts/deps.py lock              # re-lock: keep the lock's pins, resolve what is new
    python scripts/deps.py lock --upgrade    # re-lock to the newest versions pyproject's ranges allow
    python scripts/deps.py latest            # newest allowed versions: diff against the lock + tests
    python scripts/deps.py latest -- -k inference -x    # pytest arguments after --

Both build a fresh virtual environment in a temporary folder exactly the way README's first command
installs (torch first, pinned, then ``pip install -e ".[EXTRAS]"``) — with the lock as constraints for
``lock``, without it for ``latest`` and ``lock --upgrade`` — and read ``pip freeze`` back.

``lock`` writes every installed package with its exact version (transitive ones included; xti
itself and pip's own tools excluded) to ``requirements.lock``, which README's install line and CI
pass to pip as constraints (``-c``). Constraints pin what gets installed without forcing anything
to be installed, so a CUDA machine whose ``torch`` wheel pulls NVIDIA packages the lock does not
list still installs.

``latest`` works on a clone of the committed tree (HEAD). It prints which packages would differ from the lock (lock → newest), which are new or gone,
then runs the test suite in that environment and prints the tests that fail there. Run it before a
release and before you stop: a package that moved and breaks a test shows here, not in a user's
first ``pytest``. Exit status: 0 when every test passed, 1 when some failed, 2 when the environment
could not be built.

The lock is for CPython on Linux x86-64 (what CI and the developers run); on another platform,
install without it (README, *Installing*).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
README = REPO / "README.md"
NOT_LOCKED = {"pip", "setuptools", "wheel", "xti"}


def readme_install_line(readme: Path = README) -> str:
    """README's first command (the opening code block's first line)."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    if not block:
        raise SystemExit(f"{readme}: no opening ```bash block with the install command")
    return block.group(1).splitlines()[0].strip()


def install_plan(line: str) -> tuple[str, str]:
    """The torch pin and the extras that README's install line asks for."""
    torch_pin = re.search(r"pip install (torch==[\w.+]+)", line)
    extras = re.search(r'-e "\.\[([\w,-]+)\]"', line)
    if not torch_pin or not extras:
        raise SystemExit(f"README's install line does not pin torch and name extras: {line}")
    return torch_pin.group(1), extras.group(1)


def parse_lock(text: str) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) as {normalised name: version}."""
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"not a name==version line: {raw!r}")
        pins[normalise(name)] = version.strip()
    return pins


def normalise(name: str) -> str:
    """PEP 503 name normalisation (``Foo_Bar`` and ``foo-bar`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, **kw)


def build_env(where: Path, constraints: Path | None, src: Path = REPO) -> dict[str, str]:
    """A fresh venv with `src` installed as README's first command does; returns ``pip freeze``
    as pins."""
    torch_pin, extras = install_plan(readme_install_line(src / "README.md"))
    run([sys.executable, "-m", "venv", str(where)], check=True)
    py = str(where / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, torch_pin], check=True)
    with_lock = ["-c", str(constraints)] if constraints else []
    if run([*pip, *with_lock, "-e", f".[{extras}]"], cwd=src).returncode != 0:
        hint = " (try `lock --upgrade`: a range may exclude a locked pin)" if constraints else ""
        raise SystemExit(f"pip could not install .[{extras}]{hint}")
    frozen = run([py, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                 capture_output=True, text=True).stdout  # fmt: skip
    # a local label (torch's "+cpu") would refuse the CUDA build of the same release; "==2.13.0"
    # accepts every local variant of 2.13.0 (PEP 440)
    pins = parse_lock(frozen)
    return {k: v.split("+", 1)[0] for k, v in pins.items() if k not in NOT_LOCKED}


def write_lock(pins: dict[str, str], upgrade: bool) -> None:
    torch_pin, extras = install_plan(readme_install_line())
    how = "lock --upgrade" if upgrade else "lock"
    head = [
        f"# Generated by `python scripts/deps.py {how}` on {time.strftime('%Y-%m-%d')} from",
        f"# pyproject.toml's ranges ({torch_pin}, extras {extras}) with CPython "
        f"{platform.python_version()} on {sys.platform}-{platform.machine()}.",
        "# Used as constraints by README's install line and CI; do not edit by hand.",
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.items())]
    tmp = LOCK.with_suffix(".lock.tmp")
    tmp.write_text("\n".join(head + body) + "\n")
    os.replace(tmp, LOCK)
    print(f"wrote {LOCK.relative_to(REPO)} ({len(body)} packages)")


def diff(locked: dict[str, str], newest: dict[str, str]) -> list[str]:
    """Lines naming every package whose newest allowed version is not the locked one."""
    lines = []
    for name in sorted(set(locked) | set(newest)):
        old, new = locked.get(name), newest.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"  + {name}=={new} (not in the lock)")
        elif new is None:
            lines.append(f"  - {name}=={old} (no longer installed)")
        else:
            lines.append(f"  ~ {name}: {old} -> {new}")
    return lines


def latest(env_dir: Path, pytest_args: list[str]) -> int:
    """The committed tree (a clone of HEAD, so edits in progress cannot change the result) with
    the newest allowed versions: the diff against its lock, then its test suite."""
    src = env_dir.parent / "src"
    run(["git", "clone", "-q", str(REPO), str(src)], check=True)
    newest = build_env(env_dir, None, src)
    lock = src / LOCK.name
    locked = parse_lock(lock.read_text()) if lock.is_file() else {}
    changes = diff(locked, newest)
    print(f"\nnewest allowed versions vs {LOCK.name}: {len(changes)} difference(s)")
    print("\n".join(changes) if changes else "  (none: the lock is the newest allowed set)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(WANDB_MODE="offline", VIRTUAL_ENV=str(env_dir), XTI_CACHE=str(src / ".cache"))
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"
    args = pytest_args or ["-q", "-p", "no:cacheprovider"]
    t = time.perf_counter()
    proc = run([str(env_dir / "bin" / "python"), "-m", "pytest", *args], cwd=src, env=env,
               capture_output=True, text=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)))
    last = [ln for ln in out.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    print(f"\ntests with the newest versions ({time.perf_counter() - t:.0f} s): {last[0]}")
    for name in failed:
        print(f"  failed: {name}")
    if proc.returncode not in (0, 1):
        print(out[-3000:])
    return 0 if proc.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("command", choices=["lock", "latest"])
    ap.add_argument("--upgrade", action="store_true", help="lock: ignore the current pins")
    ap.add_argument("--keep", metavar="DIR", help="build in DIR (venv/, src/) and keep it")
    ap.add_argument("pytest_args", nargs="*", help="latest: pytest arguments (after --)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xti-deps-") as tmp:
        env_dir = (Path(args.keep).resolve() if args.keep else Path(tmp)) / "venv"
        if args.command == "latest":
            return latest(env_dir, args.pytest_args)
        use = None if args.upgrade or not LOCK.is_file() else LOCK
        write_lock(build_env(env_dir, use), upgrade=args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
