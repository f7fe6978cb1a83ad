"""deploy/compose.yaml: services, mounts, build contexts and start-up order."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.yaml_tree import strings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"

EXPECTED_SERVICES = {"postgres", "migrate", "listener", "prometheus", "alertmanager", "grafana"}


def load() -> dict[str, Any]:
    """Parse compose.yaml (YAML merge keys resolved by PyYAML)."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def services() -> dict[str, dict[str, Any]]:
    """Services by name."""
    result: dict[str, dict[str, Any]] = load()["services"]
    return result


def bind_sources(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each relative bind mount, short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        if source.startswith((".", "/")):
            yield source, target


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {service: condition}, for list or mapping syntax."""
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def test_expected_services() -> None:
    """The stack has exactly the agreed services."""
    assert set(services()) == EXPECTED_SERVICES


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_service_has_image_or_build(name: str) -> None:
    """Every service can be started: it names an image or a build."""
    service = services()[name]
    assert "image" in service or "build" in service


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_bind_mount_sources_exist(name: str) -> None:
    """Every relative bind-mount source exists relative to deploy/."""
    for source, _target in bind_sources(services()[name]):
        assert not source.startswith("/"), f"{name}: absolute host path {source}"
        assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


@pytest.mark.parametrize("name", ["migrate", "listener"])
def test_build_context_has_dockerfile(name: str) -> None:
    """The app services build the repository root's Dockerfile."""
    build = services()[name]["build"]
    context = build if isinstance(build, str) else build["context"]
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (DEPLOY / context).resolve() == REPO
    assert (DEPLOY / context / dockerfile).is_file()


def test_depends_on_targets_exist() -> None:
    """depends_on only names services of this file, with known conditions."""
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    all_services = services()
    for name, service in all_services.items():
        for dep, condition in depends_on(service).items():
            assert dep in all_services, f"{name} depends on unknown {dep}"
            assert condition in conditions


def test_service_healthy_needs_a_healthcheck() -> None:
    """A service waited on as healthy defines a healthcheck (postgres: pg_isready)."""
    all_services = services()
    for service in all_services.values():
        for dep, condition in depends_on(service).items():
            if condition == "service_healthy":
                assert "healthcheck" in all_services[dep], dep
    test = " ".join(all_services["postgres"]["healthcheck"]["test"])
    assert "pg_isready" in test


def test_startup_order() -> None:
    """migrate waits for a healthy postgres and runs once; listener waits for migrate."""
    all_services = services()
    assert depends_on(all_services["migrate"])["postgres"] == "service_healthy"
    assert all_services["migrate"]["restart"] == "no"
    assert depends_on(all_services["listener"])["migrate"] == "service_completed_successfully"


def test_app_commands_are_subcommands() -> None:
    """The image's ENTRYPOINT is token-reset, so command holds only the subcommand."""
    all_services = services()
    assert all_services["migrate"]["command"] == ["migrate"]
    assert all_services["listener"]["command"] == ["listen"]


def test_listener_environment_and_port() -> None:
    """The listener gets DATABASE_URL, a required CRON_SECRET, and publishes 8080 locally."""
    listener = services()["listener"]
    env = listener["environment"]
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["CRON_SECRET"].startswith("${CRON_SECRET:?")
    assert "127.0.0.1:8080:8080" in listener["ports"]
    assert "DATABASE_URL" in services()["migrate"]["environment"]


def test_listener_name_is_stable() -> None:
    """A fixed LISTENER_NAME: the container's random host name would make every
    restart a first start (a new cursor, resets written while down never counted)."""
    name = services()["listener"]["environment"]["LISTENER_NAME"]
    assert isinstance(name, str)
    assert name.strip()
    assert "$" not in name


@pytest.mark.parametrize("name", sorted(EXPECTED_SERVICES))
def test_published_ports_are_loopback_only(name: str) -> None:
    """Nothing is published on every interface of the host (the stack has dev passwords)."""
    for port in services()[name].get("ports", []):
        published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port}"
        assert published.startswith("127.0.0.1:"), f"{name}: {port}"


def database_user(service: str) -> str:
    """The user of a service's DATABASE_URL."""
    url = services()[service]["environment"]["DATABASE_URL"]
    return str(url.split("://", 1)[1].split(":", 1)[0])


def test_app_services_log_in_as_a_member_of_token_reset_app_not_the_superuser() -> None:
    """migrate and listen use the login role the init script creates, never POSTGRES_USER."""
    postgres = services()["postgres"]
    superuser = postgres["environment"]["POSTGRES_USER"]
    assert database_user("migrate") == database_user("listener") == "token_reset"
    assert superuser != "token_reset"
    mounts = dict(bind_sources(postgres))
    init = mounts["./postgres/init-roles.sh"]
    assert init.startswith("/docker-entrypoint-initdb.d/")
    roles = mounts["./postgres/roles.sql"]
    script = (DEPLOY / "postgres" / "init-roles.sh").read_text(encoding="utf-8")
    assert roles in script
    assert "login_role=token_reset" in script
    sql = (DEPLOY / "postgres" / "roles.sql").read_text(encoding="utf-8")
    assert "NOSUPERUSER" in sql
    assert "IN ROLE token_reset_app" in sql


def test_prometheus_mounts_config_and_rules_side_by_side() -> None:
    """prometheus.yml and rules.yml land in one directory (rule_files is relative)."""
    mounts = dict(bind_sources(services()["prometheus"]))
    config = Path(mounts["./prometheus/prometheus.yml"])
    rules = Path(mounts["./prometheus/rules.yml"])
    assert config.parent == rules.parent
    assert rules.name == "rules.yml"
    assert f"--config.file={config}" in services()["prometheus"]["command"]


def test_alertmanager_mounts_its_config() -> None:
    """Alertmanager reads the mounted alertmanager.yml."""
    mounts = dict(bind_sources(services()["alertmanager"]))
    target = mounts["./alertmanager/alertmanager.yml"]
    assert f"--config.file={target}" in services()["alertmanager"]["command"]


def test_named_volumes_declared() -> None:
    """Every named volume a service uses is declared at the top level."""
    declared = set(load().get("volumes") or {})
    for service in services().values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in declared, source


def test_interpolation_is_well_formed() -> None:
    """Every `$` in a value is `${NAME...}` or an escaped `$$` (compose rejects `$(`)."""
    for value in strings(load()):
        without_escapes = value.replace("$$", "")
        for match in re.finditer(r"\$", without_escapes):
            assert re.match(
                r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}", without_escapes[match.start() :]
            ), value
