"""deploy/kubernetes/: schema-valid manifests that run the service the way it needs to run.

Every manifest is validated offline against the Kubernetes API schemas bundled in the
PyPI package kubernetes-validate (strict: an unknown or misspelt field is an error,
where a real API server would drop it silently).  The prometheus-operator resources
(ServiceMonitor, PrometheusRule) have no schema there; a small one of ours, written
from the operator's CRDs and just as strict, checks them.  The rest proves what a
schema cannot: the probes hit the service's real paths, the grace period outlasts the
shutdown timeout the service will actually read, LISTENER_NAME is the pod's stable
name, the secret files land where the environment points, no secret is in the clear,
the scrape job is the one the alert rules select, the image tag is the release.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from listener import __version__
from listener.config import Settings
from tests.deploy.k8s_manifests import (
    DOCKERFILE,
    K8S,
    KUSTOMIZATION,
    REPO,
    SAMPLE_SECRETS,
    SECRET_EXAMPLE,
    all_documents,
    applied,
    dockerfile_version,
    documents,
    env_of,
    job,
    kustomization,
    listener_container,
    manifest_files,
    matches,
    migrate_container,
    only,
    pod_environment,
    statefulset,
    workloads,
)
from tests.deploy.yaml_tree import strings

RULES = REPO / "deploy" / "prometheus" / "rules.yml"

# The oldest Kubernetes these manifests are for (README, Deployment), and the newest
# the pinned kubernetes-validate knows: both fixed, so a run never depends on the day.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Kinds that are CRDs of the prometheus-operator, checked by SCHEMAS below instead.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
# What marks an example value as one to replace (and what the service refuses).
PLACEHOLDER = "REPLACE-ME"
# How much longer than the service's own shutdown deadline the kubelet must wait.
MIN_GRACE_MARGIN_SECONDS = 5


def listener_settings(tmp_path: Path) -> Settings:
    """What `token-reset listen` reads from the StatefulSet's environment."""
    env = pod_environment(statefulset(), listener_container(), SAMPLE_SECRETS, tmp_path)
    settings = Settings.from_env(env, stdout_is_tty=False)
    settings.require_database()  # what `listen` checks next, before it starts
    settings.validate_cron_secret()
    return settings


# ---------------------------------------------------------------- schemas


def test_there_are_manifests_and_a_kustomization() -> None:
    """deploy/kubernetes holds the workloads, services and monitoring resources."""
    kinds = {doc["kind"] for _, doc in all_documents()}
    assert {
        "Job",
        "StatefulSet",
        "Service",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    assert KUSTOMIZATION.is_file()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    """Each built-in resource passes the strict schema of that Kubernetes release (strict:
    the validator rejects a misspelt field, which an API server would drop silently)."""
    misspelt = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "selectr": {"a": "b"}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, version, strict=True)
    checked = 0
    for path, doc in [*all_documents(), *readme_examples()]:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{path.name} {doc['kind']}: {where}: {error.message}")
        checked += 1
    assert checked >= 7


def readme_examples() -> list[tuple[Path, dict[str, Any]]]:
    """The Kubernetes resources shown in README.md (```yaml blocks with a kind)."""
    readme = REPO / "README.md"
    blocks = re.findall(r"```yaml\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)
    return [
        (readme, doc)
        for block in blocks
        if isinstance(doc := yaml.safe_load(block), dict) and "apiVersion" in doc
    ]


_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "labels": _STRINGS, "annotations": _STRINGS},
}
# The fields of monitoring.coreos.com/v1 these manifests may use, with the types and
# patterns of the operator's CRDs (servicemonitors, prometheusrules); nothing else.
SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "jobLabel": {"type": "string"},
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "additionalProperties": False,
                        "properties": {"matchLabels": _STRINGS},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": _DURATION,
                                "scrapeTimeout": _DURATION,
                                "honorLabels": {"type": "boolean"},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STRINGS,
                                            "annotations": _STRINGS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


@pytest.mark.parametrize("kind", sorted(CUSTOM_KINDS))
def test_custom_resources_match_the_operator_crd(kind: str) -> None:
    """ServiceMonitor and PrometheusRule use only CRD fields, with the CRD's types (and
    nothing else: the operator's CRDs prune an unknown field silently)."""
    found = [doc for _, doc in all_documents() if doc["kind"] == kind]
    assert len(found) == 1, kind
    jsonschema.validate(found[0], SCHEMAS[kind])
    misspelt = {**found[0], "spec": {**found[0]["spec"], "endpoint": []}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, SCHEMAS[kind])


# ---------------------------------------------------------------- kustomization


def test_the_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    """Each file is listed once and exists; the placeholder Secret is never applied."""
    resources = kustomization()["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (K8S / name).is_file(), name
    expected = {p.name for p in manifest_files()} - {SECRET_EXAMPLE.name}
    assert set(resources) == expected
    assert not [d for d in applied() if d["kind"] == "Secret"]


def test_image_tag_is_the_dockerfile_version_everywhere() -> None:
    """Every container (the README's CronJob example's too) runs monthly-token-reset at
    the image's OCI version label, which the kustomization's `images` entry (the one
    place to change it) sets too."""
    version = dockerfile_version()
    assert version == __version__
    pods = [w["spec"]["template"]["spec"] for w in workloads()]
    pods += [  # and the README's CronJob example
        doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        for _, doc in readme_examples()
        if doc["kind"] == "CronJob"
    ]
    images = [c["image"] for pod in pods for c in pod["containers"]]
    assert images
    assert set(images) == {f"monthly-token-reset:{version}"}
    (entry,) = kustomization()["images"]
    assert entry["name"] == "monthly-token-reset"
    assert str(entry["newTag"]) == version


# ---------------------------------------------------------------- migrate Job


def test_migrate_job_runs_token_reset_migrate_once_with_bounded_retries() -> None:
    """`token-reset migrate` (the image's entrypoint + args), retried a few times, cleaned up."""
    spec = job()["spec"]
    migrate = migrate_container()
    assert "command" not in migrate  # keeps the image's ENTRYPOINT token-reset
    assert migrate["args"] == ["migrate"]
    assert 1 <= spec["backoffLimit"] <= 6
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # A bad setting exits 2 (README, Configuration): retrying cannot fix it.
    rules = spec["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "migrate", "operator": "In", "values": [2]},
    } in rules
    # Waiting for another migration's lock (300 s by default) must fit in the deadline.
    assert spec["activeDeadlineSeconds"] > Settings().migrate_lock_timeout_seconds


def test_migrate_job_reads_the_owner_database_url_from_the_secret(tmp_path: Path) -> None:
    """DATABASE_URL comes from the Secret (a mounted file), and is the owner's URL."""
    env = env_of(migrate_container())
    assert "DATABASE_URL" not in env or "valueFrom" in env["DATABASE_URL"]
    resolved = pod_environment(job(), migrate_container(), SAMPLE_SECRETS, tmp_path)
    settings = Settings.from_env(resolved, stdout_is_tty=False)
    assert settings.database_url == SAMPLE_SECRETS["migrate-database-url"]
    assert settings.cron_secret is None


# ---------------------------------------------------------------- listener


def test_listener_is_a_statefulset_of_two_running_token_reset_listen() -> None:
    """Two replicas with stable names; the image's entrypoint with `listen`."""
    sts = statefulset()
    assert sts["spec"]["replicas"] == 2
    listener = listener_container()
    assert "command" not in listener
    assert listener["args"] == ["listen"]
    headless = only("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_listener_name_is_the_pod_name_from_the_downward_api(tmp_path: Path) -> None:
    """LISTENER_NAME = metadata.name: token-reset-0, token-reset-1, the same after a
    restart or a reschedule, so each replica's ledger cursor survives it."""
    entry = env_of(listener_container())["LISTENER_NAME"]
    assert entry["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert listener_settings(tmp_path).listener_name == "token-reset-0"
    text = (K8S / "listener-statefulset.yaml").read_text(encoding="utf-8")
    comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert any("LISTENER_NAME" in line for line in comments), "say why in a comment"
    assert any("metadata.name" in line for line in comments)


def test_the_listener_environment_is_accepted_by_the_service(tmp_path: Path) -> None:
    """Settings.from_env (what `listen` runs at start) accepts the StatefulSet's
    environment, the secret files resolving where the Secret volume puts them."""
    settings = listener_settings(tmp_path)
    assert settings.database_url == SAMPLE_SECRETS["listener-database-url"]
    assert settings.cron_secret == SAMPLE_SECRETS["cron-secret"]
    assert settings.http_host == "0.0.0.0"  # noqa: S104  # reachable by kubelet and Prometheus
    assert settings.log_format == "json"


def test_secrets_reach_the_service_as_files_not_variables() -> None:
    """DATABASE_URL and CRON_SECRET come as *_FILE paths into a read-only Secret volume
    (the environment leaks to /proc and crash reports), never as values."""
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for spec in pod["containers"]:
            env = env_of(spec)
            assert "DATABASE_URL" not in env
            assert "CRON_SECRET" not in env
            assert "DATABASE_URL_FILE" in env
            for mount in spec.get("volumeMounts", []):
                if "secret" in volumes[mount["name"]]:
                    assert mount["readOnly"] is True
                    assert volumes[mount["name"]]["secret"]["defaultMode"] <= 0o440


def test_probes_use_the_service_paths_on_its_port(tmp_path: Path) -> None:
    """Liveness /healthz (alive), readiness /readyz (connected, caught up, tasks up), on
    the named port whose number the service binds (HTTP_PORT)."""
    listener = listener_container()
    (port,) = listener["ports"]
    assert port["name"] == "http"
    assert port["containerPort"] == listener_settings(tmp_path).http_port
    liveness = listener["livenessProbe"]["httpGet"]
    readiness = listener["readinessProbe"]["httpGet"]
    assert liveness == {"path": "/healthz", "port": "http"}
    assert readiness == {"path": "/readyz", "port": "http"}
    # One slow answer (a loaded node) must not restart a healthy process.
    assert listener["livenessProbe"]["failureThreshold"] >= 3


def test_grace_period_outlasts_the_shutdown_timeout(tmp_path: Path) -> None:
    """SIGTERM to exit takes at most SHUTDOWN_TIMEOUT_SECONDS (what the service reads
    from this environment, its default 10 s when unset); the kubelet waits longer."""
    grace = statefulset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    shutdown = listener_settings(tmp_path).shutdown_timeout_seconds
    assert grace >= shutdown + MIN_GRACE_MARGIN_SECONDS


@pytest.mark.parametrize("kind", ["StatefulSet", "Job"])
def test_pods_are_locked_down(kind: str) -> None:
    """Non-root as the image's uid, read-only root filesystem, no capabilities, no
    privilege escalation, the runtime's seccomp profile, no service account token."""
    pod = only(kind)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE.read_text(), re.M)
    assert dockerfile_user
    assert pod_security["runAsUser"] == int(dockerfile_user.group(1))
    assert pod_security["runAsGroup"] == int(dockerfile_user.group(2))
    # The kubelet gives Secret files (root's) this group: how uid 10001 reads them.
    assert pod_security["fsGroup"] == pod_security["runAsGroup"]
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for spec in pod["containers"]:
        security = spec["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security.get("privileged", False) is False


@pytest.mark.parametrize("kind", ["StatefulSet", "Job"])
def test_every_container_has_requests_and_limits(kind: str) -> None:
    """CPU and memory requests and limits, requests within limits."""
    for spec in only(kind)["spec"]["template"]["spec"]["containers"]:
        resources = spec["resources"]
        for key in ("cpu", "memory"):
            request = quantity(resources["requests"][key])
            limit = quantity(resources["limits"][key])
            assert 0 < request <= limit, (spec["name"], key)


_SUFFIXES = {"m": 1e-3, "": 1.0, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (100m, 1, 128Mi) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|)", str(text))
    assert match, text
    return float(match.group(1)) * _SUFFIXES[match.group(2)]


def test_the_service_routes_to_the_listener_port() -> None:
    """A ClusterIP Service `token-reset`, port http, selecting the listener's pods."""
    service = only("Service", "token-reset")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert matches(service["spec"]["selector"], labels)
    assert matches(statefulset()["spec"]["selector"]["matchLabels"], labels)
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http"
    assert port["targetPort"] == "http"


def test_the_disruption_budget_keeps_a_listener_running() -> None:
    """Voluntary disruptions (node drains) take at most one of the two replicas."""
    budget = only("PodDisruptionBudget")["spec"]
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert matches(budget["selector"]["matchLabels"], labels)
    assert budget["maxUnavailable"] == 1


# ---------------------------------------------------------------- secrets


def test_no_secret_in_the_clear() -> None:
    """The only Secret is the example, stringData whose every value says REPLACE-ME;
    no manifest carries a credential in a URL or a secret-looking variable's value."""
    assert [path for path, doc in all_documents() if doc["kind"] == "Secret"] == [SECRET_EXAMPLE]
    for path, doc in all_documents():
        if doc["kind"] == "Secret":
            assert path == SECRET_EXAMPLE
            assert "data" not in doc  # base64 would hide what the value is
            for key, value in doc["stringData"].items():
                assert PLACEHOLDER in value, key
            continue
        for value in strings(doc):
            if re.search(r"://[^/\s:@]+:[^/\s@]+@", value):
                pytest.fail(f"{path.name}: credentials in a URL: {value[:40]}...")
        template = doc.get("spec", {}).get("template", {})
        for spec in template.get("spec", {}).get("containers", []):
            for name, entry in env_of(spec).items():
                secretive = re.search(r"SECRET|PASSWORD|TOKEN|URL$|KEY", name)
                if secretive and not name.endswith("_FILE"):
                    assert "value" not in entry, f"{path.name}: {name} in plain text"


def test_example_secret_placeholders_are_refused_at_start(tmp_path: Path) -> None:
    """An example Secret applied unchanged cannot run with a published value: the real
    `token-reset migrate` / `listen`, given the pod's environment with one placeholder
    projected, exits 2 at start with one line naming the variable, never the value."""
    (secret,) = documents(SECRET_EXAMPLE)
    placeholders = secret["stringData"]
    for key, value in placeholders.items():
        assert PLACEHOLDER in value
        values = dict(SAMPLE_SECRETS, **{key: value})
        migrate = key.startswith("migrate")
        workload = job() if migrate else statefulset()
        spec = migrate_container() if migrate else listener_container()
        env = pod_environment(workload, spec, values, tmp_path / key)
        result = subprocess.run(
            [sys.executable, "-m", "listener", *spec["args"]],
            env={"PATH": os.environ.get("PATH", ""), **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        variable = "CRON_SECRET" if key == "cron-secret" else "DATABASE_URL"
        assert result.returncode == 2, (key, result.stdout, result.stderr)
        (line,) = result.stderr.splitlines()
        assert variable in line, line
        assert PLACEHOLDER not in result.stdout + result.stderr


def test_every_secret_key_used_is_in_the_example() -> None:
    """The pods read only keys the example Secret (and so the operator) provides."""
    (secret,) = documents(SECRET_EXAMPLE)
    name, keys = secret["metadata"]["name"], set(secret["stringData"])
    assert keys == set(SAMPLE_SECRETS)
    used: set[str] = set()
    for workload in workloads():
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == name
                used |= {item["key"] for item in volume["secret"]["items"]}
    assert used == keys


# ---------------------------------------------------------------- monitoring


def rules_jobs() -> set[str]:
    """Every job="..." the alert rules select."""
    return set(re.findall(r'job="([^"]+)"', RULES.read_text(encoding="utf-8")))


def test_the_scrape_job_is_the_one_the_alert_rules_select() -> None:
    """The ServiceMonitor selects exactly the metrics Service, and the `job` label the
    operator gives its targets (the Service's jobLabel label, not its name, so a
    kustomize namePrefix cannot change it) is the job rules.yml's alerts select."""
    monitor = only("ServiceMonitor")["spec"]
    services = [d for d in applied() if d["kind"] == "Service"]
    selected = [
        s for s in services if matches(monitor["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == ["token-reset"]
    job_name = selected[0]["metadata"]["labels"][monitor["jobLabel"]]
    assert rules_jobs() == {job_name}
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in selected[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


# ---------------------------------------------------------------- docs


def test_every_manifest_is_documented() -> None:
    """deploy/README.md has a table row per file; README's Deployment names each one."""
    runbook = (REPO / "deploy" / "README.md").read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    deployment = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    for path in [*manifest_files(), KUSTOMIZATION]:
        row = re.search(rf"^\| `kubernetes/{re.escape(path.name)}`", runbook, re.M)
        assert row, f"deploy/README.md has no row for {path.name}"
        assert path.name in deployment, f"README Deployment does not mention {path.name}"
    assert "metadata.name" in deployment
