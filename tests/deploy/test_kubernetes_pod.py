"""The manifests' pods, run for real: the migrate Job, then two listener replicas.

No cluster runs here, so the test does what the kubelet would, read from the
manifests themselves: the image's ENV (Dockerfile) overlaid with the container's
env, the Secret's keys projected as files where the volumeMounts put them (with
defaultMode and fsGroup), LISTENER_NAME from the pod's name (token-reset-0,
token-reset-1).  As root, each process also runs locked down as the securityContext
says (tests/deploy/pod_sandbox.py: uid/gid 10001, no capabilities, no_new_privs, and a
read-only filesystem, without even the /tmp emptyDir), so a write the service needs
would show up here.  One deviation: HTTP_PORT is 0 (a free port, from the
`http_listening` line), since two replicas share this host's network.

The listener logs in as a role that is only a member of token_reset_listener, as the
example Secret says it may; the Job as the database owner.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.deploy.k8s_manifests import (
    REPO,
    SAMPLE_SECRETS,
    job,
    listener_container,
    migrate_container,
    pod_environment,
    statefulset,
)
from tests.deploy.test_dockerfile import args_of, final_stage
from tests.support.database import run_sync
from tests.support.processes import Process, run_to_end, wait_for_log_event, wait_until_ready

pytestmark = pytest.mark.acceptance

SANDBOXED = os.geteuid() == 0
START_SECONDS = 30.0
CRON_SECRET = "k8s-pod-test-" + "s" * 24


def image_env() -> dict[str, str]:
    """The runtime stage's ENV, with this interpreter's bin directory as the image's venv."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    for instruction in args_of("ENV", final_stage()):
        for pair in instruction.split():
            key, _, value = pair.partition("=")
            if key != "PATH":
                env[key] = value
    return env


def pod_securitycontext(workload: dict[str, Any]) -> tuple[int, int]:
    """runAsUser and runAsGroup of a workload's pods."""
    security = workload["spec"]["template"]["spec"]["securityContext"]
    return int(security["runAsUser"]), int(security["runAsGroup"])


def pod_argv(workload: dict[str, Any], args: list[str], pod_dir: Path, probe: Path) -> list[str]:
    """`python -m listener ARGS` (the image's token-reset), locked down as root."""
    argv = [sys.executable, "-m", "listener", *args]
    if not SANDBOXED:
        return argv
    uid, gid = pod_securitycontext(workload)
    stash = pod_dir / "sandbox-stash"
    stash.mkdir()
    return [
        sys.executable,
        "-m",
        "tests.deploy.pod_sandbox",
        "--uid",
        str(uid),
        "--gid",
        str(gid),
        # The interpreter, the venv, the source tree (an editable install) and the pod's
        # files, wherever this machine keeps them; the image keeps its world-readable.
        "--expose",
        str(Path(sys.base_prefix)),
        "--expose",
        str(Path(sys.prefix)),
        "--expose",
        str(REPO),
        "--expose",
        str(pod_dir),
        "--stash",
        str(stash),
        "--must-be-read-only",
        str(probe),
        "--workdir",
        str(pod_dir),
        "--",
        *argv,
    ]


@pytest.fixture
def pod_root() -> Iterator[Path]:
    """A directory the pods' uid can enter (pytest's own tmp_path is 0700 root's)."""
    root = Path(tempfile.mkdtemp(prefix="token-reset-pods-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def writable_probe(root: Path, workload: dict[str, Any]) -> Path:
    """A directory the pod's uid owns: writable but for the read-only mounts."""
    probe = root / "owned-by-the-pod-user"
    probe.mkdir()
    if SANDBOXED:
        uid, gid = pod_securitycontext(workload)
        os.chown(probe, uid, gid)
    return probe


async def listener_login(database_url: str, name: str) -> str:
    """A login role granted token_reset_listener only; its URL."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN")
        await conn.execute(f"GRANT token_reset_listener TO {name}")
    finally:
        await conn.close()
    url = database_url.replace("://postgres@", f"://{name}@", 1)
    assert url != database_url, "the test server's URL names the postgres superuser"
    return url


async def drop_login(database_url: str, name: str) -> None:
    """Remove the role again (roles are per server, not per database)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f"DROP OWNED BY {name}")
        await conn.execute(f"DROP ROLE {name}")
    finally:
        await conn.close()


async def cursor_names(database_url: str) -> set[str]:
    """The listeners' ledger cursors."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT consumer FROM token_reset_listener_cursors")
    finally:
        await conn.close()
    return {row["consumer"] for row in rows}


def request(url: str, *, method: str = "GET", token: str | None = None) -> tuple[int, bytes]:
    """Status and body of one HTTP request (non-2xx answers included)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    call = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310  # loopback
    try:
        with urllib.request.urlopen(call, timeout=30) as response:  # noqa: S310  # loopback
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.timeout(110)
def test_the_job_and_two_replicas_run_as_the_manifests_configure_them(
    empty_database_url: str, pod_root: Path
) -> None:
    """migrate applies every migration as the Job's pod; two StatefulSet pods then pass
    their probes on the service's paths, keep cursors under their pod names, serve the
    cron endpoint with the projected CRON_SECRET as the token_reset_listener role, and
    stop within terminationGracePeriodSeconds of SIGTERM, exit 0, without one write
    refused by the read-only filesystem."""
    migrate_dir = pod_root / "migrate"
    migrate_dir.mkdir()
    secrets = dict(SAMPLE_SECRETS, **{"migrate-database-url": empty_database_url})
    env = image_env() | pod_environment(job(), migrate_container(), secrets, migrate_dir)
    probe = writable_probe(migrate_dir, job())
    done = run_to_end(
        pod_argv(job(), migrate_container()["args"], migrate_dir, probe),
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    versions = sorted(int(p.name[:4]) for p in (REPO / "sql" / "migrations").glob("[0-9]*.sql"))
    assert json.loads(done.stdout)["applied"] == versions

    role = f"tr_k8s_listener_{os.getpid()}"
    listener_url = run_sync(listener_login, empty_database_url, role)
    sts = statefulset()
    grace = sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    processes: list[Process] = []
    try:
        for ordinal in range(sts["spec"]["replicas"]):
            pod_dir = pod_root / f"token-reset-{ordinal}"
            pod_dir.mkdir()
            secrets = dict(
                SAMPLE_SECRETS,
                **{"listener-database-url": listener_url, "cron-secret": CRON_SECRET},
            )
            env = image_env() | pod_environment(
                sts, listener_container(), secrets, pod_dir, ordinal=ordinal
            )
            env["HTTP_PORT"] = "0"  # two replicas on one host network
            probe = writable_probe(pod_dir, sts)
            argv = pod_argv(sts, listener_container()["args"], pod_dir, probe)
            processes.append(Process(pod_dir.name, argv, pod_dir, env, cwd=REPO))

        ports = [
            int(wait_for_log_event(process, "http_listening", START_SECONDS)["port"])
            for process in processes
        ]
        for process, port in zip(processes, ports, strict=True):
            base = f"http://127.0.0.1:{port}"
            assert request(f"{base}{probe_path('livenessProbe')}")[0] == 200
            wait_until_ready(process, f"{base}{probe_path('readinessProbe')}", START_SECONDS)
        assert run_sync(cursor_names, empty_database_url) >= {"token-reset-0", "token-reset-1"}

        endpoint = f"http://127.0.0.1:{ports[0]}/api/admin/reset-monthly-tokens"
        assert request(endpoint, method="POST", token="wrong-secret-0123456789")[0] == 401
        status, body = request(endpoint, method="POST", token=CRON_SECRET)
        assert status == 200, body
        assert json.loads(body)["success"] is True

        for process in processes:
            process.popen.send_signal(signal.SIGTERM)
        started = time.monotonic()
        for process in processes:
            code = process.popen.wait(timeout=grace)
            assert code == 0, process.output()
        assert time.monotonic() - started < grace
    finally:
        for process in processes:
            process.stop()
        run_sync(drop_login, empty_database_url, role)

    for process in processes:
        text = process.output()
        assert "Read-only file system" not in text
        assert "Permission denied" not in text
        events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
        assert "listener_caught_up" in events
        assert events[-1] == "listener_stopped"


def probe_path(kind: str) -> str:
    """The path of the listener's liveness or readiness probe."""
    return str(listener_container()[kind]["httpGet"]["path"])
