"""The README's install line, CI and the lock file agree: CI installs exactly what a new user
installs, and the lock pins every package pyproject asks for at a version its range allows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import deps  # noqa: E402  (scripts/deps.py: the lock tool)


def _ci() -> str:
    return (REPO / ".ci" / "run").read_text()


def test_readme_first_command_installs_with_the_lock_and_runs_the_demo():
    line = deps.readme_install_line()
    torch_pin, extras = deps.install_plan(line)
    assert line == (
        f'pip install {torch_pin} && pip install -c requirements.lock -e ".[{extras}]" '
        "&& python train.py"
    )
    assert deps.parse_lock((REPO / "requirements.lock").read_text())["torch"] == torch_pin[7:]


def test_ci_runs_readme_commands_and_installs_nothing_of_its_own():
    script = _ci()
    code = [
        ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]
    assert not [ln for ln in code if re.search(r"\bpip\b|\buv\b|setup\.py", ln)], code
    assert "first_cmd=$(sed -n '/^```bash$/{n;p;q}' README.md)" in code
    assert 'eval "$first_cmd"' in code and 'eval "$test_cmd"' in code
    # the sed expression above reads the same line as deps.readme_install_line()
    readme = (REPO / "README.md").read_text().splitlines()
    opening = readme.index("```bash")
    assert readme[opening + 1] == deps.readme_install_line()
    assert re.match(r"^python -m pytest", readme[opening + 2])


def _requirements(extras: set[str]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs, seen, todo = [], set(), list(extras)
    reqs += [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["optional-dependencies"][extra]):
            if r.name == "xti":
                todo += list(r.extras)
            else:
                reqs.append(r)
    return reqs


def test_lock_pins_every_required_package_inside_its_range():
    _, extras = deps.install_plan(deps.readme_install_line())
    pins = deps.parse_lock((REPO / "requirements.lock").read_text())
    reqs = _requirements(set(extras.split(",")))
    assert len(reqs) > 15
    for req in reqs:
        name = deps.normalise(req.name)
        assert name in pins, f"{req.name} is required but not in requirements.lock: re-lock"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {req}: re-lock"
        )


def test_lock_tools_parse_and_diff():
    pins = deps.parse_lock("# c\nFoo_Bar==1.0\n\nbaz==2  # note\n")
    assert pins == {"foo-bar": "1.0", "baz": "2"}
    lines = deps.diff(pins, {"foo-bar": "1.1", "qux": "3"})
    assert lines == ["  - baz==2 (no longer installed)", "  ~ foo-bar: 1.0 -> 1.1",
                     "  + qux==3 (not in the lock)"]  # fmt: skip
