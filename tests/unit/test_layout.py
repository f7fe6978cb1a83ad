"""The package's layout: one module per command, loaded lazily, and no import cycle."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from listener.cli import COMMANDS, build_parser

PACKAGE = Path(__file__).resolve().parents[2] / "listener"


def module_name(path: Path) -> str:
    """listener/commands/listen.py -> listener.commands.listen (a package is its __init__)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere (type-checking imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from listener import x` names a module x when listener.x is one.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(path) for path in paths}
    return {
        module_name(path): imported_modules(path, known) - {module_name(path)} for path in paths
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of module names, or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in stack:
            return [*stack[stack.index(module) :], module]
        if module in done:
            return None
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if (cycle := visit(target)) is not None:
                return cycle
        stack.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if (cycle := visit(module)) is not None:
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    """The check itself sees a cycle when there is one."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle() -> None:
    """No module imports itself through others (watchdog and alertmanager included)."""
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(("module", "forbidden"), [("listener.alertmanager", "listener.watchdog")])
def test_module_does_not_import(module: str, forbidden: str) -> None:
    """The judgement lives in listener.assessment: the push does not reach into the watchdog."""
    assert forbidden not in import_graph()[module]


def modules_loaded_by(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `statement`."""
    code = f"{statement}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(done.stdout))


def test_importing_the_cli_loads_no_command() -> None:
    """`import listener.cli` loads no command module, no service and no HTTP server."""
    loaded = modules_loaded_by("import listener.cli")
    heavy = {"listener.service", "listener.http_app", "hypercorn", "starlette", "apprise"}
    assert not loaded & heavy
    assert not {name for name in loaded if name.startswith(("listener.commands.", "listener.demo"))}


def test_every_verb_is_a_module_of_its_own() -> None:
    """Each verb of the table names listener/commands/<verb>.py, and the parser knows it."""
    files = {path.stem for path in (PACKAGE / "commands").glob("*.py")} - {"__init__"}
    assert set(COMMANDS) == files
    for verb in COMMANDS:
        required = ["--test"] if verb == "notify" else []
        assert build_parser().parse_args([verb, *required]).command == verb


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_a_command_module_loads_alone(verb: str) -> None:
    """Each command module imports on its own in a fresh interpreter (no cycle at import)."""
    loaded = modules_loaded_by(f"import {COMMANDS[verb].module(verb)}")
    assert COMMANDS[verb].module(verb) in loaded


# Modules that moved keep the logger name their events always carried.
KEPT_LOGGER_NAMES = {"listener.processor": "listener.service", "listener.http_app": "listener.http"}


def test_every_module_logs_under_its_own_name() -> None:
    """One logger style: a module-level structlog.get_logger(__name__), or the name kept."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("get_logger")):
                continue
            assert ast.unparse(node.func) == "structlog.get_logger", (module, ast.unparse(node))
            (argument,) = node.args
            if module in KEPT_LOGGER_NAMES:
                assert ast.literal_eval(argument) == KEPT_LOGGER_NAMES[module]
            else:
                assert ast.unparse(argument) == "__name__", (module, ast.unparse(node))


def test_the_readme_maps_every_module() -> None:
    """README's Architecture section names each module of the package, and no other."""
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Architecture\n", 1)[1].split("\n## ", 1)[0]
    mapped = set(re.findall(r"`(listener/[\w/]+\.py)`", section))
    modules = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert mapped == modules
