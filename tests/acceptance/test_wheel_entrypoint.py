"""The Docker image's entry command, run without a container engine.

No container engine runs here, so the test does what the image does, read from the
Dockerfile itself: build the project's wheel, install it with its runtime
dependencies into a clean virtualenv, apply the runtime stage's ENV, and run
ENTRYPOINT + CMD (and the HEALTHCHECK command) from a directory outside the
repository, so the installed package must find its sql/ on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.test_dockerfile import args_of, final_stage
from tests.support.processes import Process, run_ok, wait_for_log_event, wait_until_ready

pytestmark = pytest.mark.acceptance

REPO = Path(__file__).resolve().parents[2]
IMAGE_VENV = "/opt/venv"  # where the Dockerfile installs the wheel
SECRET = "c" * 32
# pip reaches PyPI (or its cache); on this machine the whole install takes ~15 s.
INSTALL_SECONDS = 150
START_SECONDS = 30.0
STOP_SECONDS = 10.0
# Variables the test environment may carry that would configure the service behind
# the Dockerfile's back, or point Python at the source tree.
SCRUBBED = {
    "DATABASE_URL",
    "CRON_SECRET",
    "HTTP_HOST",
    "HTTP_PORT",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "ALERTMANAGER_URL",
    "RESET_SCHEDULE",
    "NOTICE_URLS",
    "NOTICE_RETRY_SECONDS",
    "PYTHONPATH",
    "VIRTUAL_ENV",
}


def exec_form(instruction: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD."""
    argv = json.loads(instruction)
    assert isinstance(argv, list), f"not exec form: {instruction}"
    return [str(item) for item in argv]


def image_env(venv: Path) -> dict[str, str]:
    """The runtime stage's ENV, with the image's venv path mapped onto ours."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in SCRUBBED and not key.startswith("PG")
    }
    for instruction in args_of("ENV", final_stage()):
        for pair in instruction.split():
            key, _, value = pair.partition("=")
            value = value.replace(IMAGE_VENV, str(venv)).replace("$PATH", os.environ["PATH"])
            env[key] = value
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtualenv holding only the project's wheel and its runtime dependencies."""
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "wheels"
    run_ok(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
        timeout=INSTALL_SECONDS,
    )
    (wheel,) = wheels.glob("*.whl")
    venv = root / "venv"
    # No pip inside (saves ~10 s of ensurepip): our pip installs into it with --python.
    run_ok([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=60)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    # As the Dockerfile does: the pinned versions the suite runs with.
    constraints = str(REPO / "constraints.txt")
    run_ok([*pip, "install", "-q", "-c", constraints, str(wheel)], timeout=INSTALL_SECONDS)
    return venv


def entry_command(venv: Path, env: dict[str, str]) -> list[str]:
    """ENTRYPOINT + CMD of the image, the program resolved on the image's PATH."""
    stage = final_stage()
    (entrypoint,) = args_of("ENTRYPOINT", stage)
    (cmd,) = args_of("CMD", stage)
    argv = exec_form(entrypoint) + exec_form(cmd)
    program = shutil.which(argv[0], path=env["PATH"])
    assert program is not None, f"{argv[0]} not on the image's PATH"
    assert Path(program).is_relative_to(venv), f"{argv[0]} resolved outside the venv: {program}"
    return [program, *argv[1:]]


def get(url: str) -> int:
    """HTTP status of a GET (non-2xx answers included)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310  # loopback http
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.timeout(INSTALL_SECONDS * 2 + 60)
def test_installed_wheel_runs_the_image_command(
    installed: Path, empty_database_url: str, tmp_path: Path
) -> None:
    """The image's migrate and ENTRYPOINT/CMD, from the wheel: serve, pass probes, stop cleanly."""
    env = image_env(installed)
    argv = entry_command(installed, env)
    assert argv[1:] == ["listen"], "the image's default command is `token-reset listen`"
    python = str(installed / "bin" / "python")

    located = run_ok(
        [python, "-c", "import listener.sql as s; print(s.sql_root())"],
        timeout=30,
        cwd=tmp_path,
        env=env,
    )
    assert Path(located.stdout.strip()).is_relative_to(installed), "sql/ must come from the wheel"

    env.update(DATABASE_URL=empty_database_url, CRON_SECRET=SECRET)
    migrated = run_ok([argv[0], "migrate"], timeout=60, cwd=tmp_path, env=env)
    versions = sorted(int(p.name[:4]) for p in (REPO / "sql" / "migrations").glob("[0-9]*.sql"))
    assert json.loads(migrated.stdout)["applied"] == versions

    env.update(HTTP_HOST="127.0.0.1", HTTP_PORT="0")
    process = Process("listen", argv, tmp_path, env, cwd=tmp_path)
    try:
        listening = wait_for_log_event(process, "http_listening", START_SECONDS)
        base = f"http://127.0.0.1:{listening['port']}"
        assert get(f"{base}/healthz") == 200
        wait_until_ready(process, f"{base}/readyz", START_SECONDS)

        (healthcheck,) = args_of("HEALTHCHECK", final_stage())
        probe = exec_form(healthcheck.split(" CMD ", 1)[1])
        probe_program = shutil.which(probe[0], path=env["PATH"])
        assert probe_program is not None
        assert Path(probe_program).is_relative_to(installed), "HEALTHCHECK must use the venv"
        run_ok(
            [probe_program, *probe[1:]],
            timeout=10,
            cwd=tmp_path,
            env={**env, "HTTP_PORT": str(listening["port"])},
        )

        (stop_signal,) = args_of("STOPSIGNAL", final_stage())
        started = time.monotonic()
        process.popen.send_signal(signal.Signals[stop_signal])
        code = process.popen.wait(timeout=STOP_SECONDS)
        assert code == 0, process.output()
        assert time.monotonic() - started < STOP_SECONDS
    finally:
        process.stop()
    lines = process.output().splitlines()
    events = [json.loads(line)["event"] for line in lines]  # LOG_FORMAT=json from the image
    assert "listener_caught_up" in events
    assert events[-1] == "listener_stopped"
