"""deploy/kubernetes/ as the tests read it: files, resources, and what a pod is given.

Shared by tests/deploy/test_kubernetes.py (the manifests) and
tests/deploy/test_kubernetes_pod.py (the service run with a pod's environment).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = K8S / "kustomization.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
DOCKERFILE = REPO / "Dockerfile"

# Well-formed values standing in for the real secrets, by Secret key.
SAMPLE_SECRETS = {
    "migrate-database-url": "postgresql://token_reset:owner-password@db:5432/token_reset",
    "listener-database-url": "postgresql://token_reset_listen:pw-of-16-chars@db:5432/token_reset",
    "cron-secret": "0123456789abcdef0123456789abcdef",
}


def manifest_files() -> list[Path]:
    """Every YAML file of deploy/kubernetes but the kustomization itself."""
    return sorted(p for p in K8S.glob("*.yaml") if p != KUSTOMIZATION)


def documents(path: Path) -> list[dict[str, Any]]:
    """The non-empty YAML documents of one file."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    """(file, resource) for every resource in every manifest, the example Secret included."""
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def kustomization() -> dict[str, Any]:
    """kustomization.yaml, parsed."""
    data: dict[str, Any] = yaml.safe_load(KUSTOMIZATION.read_text(encoding="utf-8"))
    return data


def applied() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes` creates (resources; images set below)."""
    return [doc for name in kustomization()["resources"] for doc in documents(K8S / name)]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    """The one applied resource of this kind (and name)."""
    found = [
        d
        for d in applied()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the kustomization"
    return found[0]


def statefulset() -> dict[str, Any]:
    """The listener."""
    return only("StatefulSet")


def job() -> dict[str, Any]:
    """The one-shot migration."""
    return only("Job")


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    """A container of a workload's pod template, by name."""
    containers = workload["spec"]["template"]["spec"]["containers"]
    (found,) = [c for c in containers if c["name"] == name]
    return dict(found)


def listener_container() -> dict[str, Any]:
    """The listener's container."""
    return container(statefulset(), "listener")


def migrate_container() -> dict[str, Any]:
    """The migration's container."""
    return container(job(), "migrate")


def workloads() -> list[dict[str, Any]]:
    """Every applied resource with a pod template."""
    return [d for d in applied() if "template" in d.get("spec", {})]


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in spec.get("env", [])}


def pod_environment(
    workload: dict[str, Any],
    spec: dict[str, Any],
    secrets: dict[str, str],
    root: Path,
    *,
    ordinal: int = 0,
) -> dict[str, str]:
    """The environment the kubelet would give this container, secrets projected under root.

    Plain values as written; the downward API's metadata.name as the StatefulSet's pod
    number `ordinal` is named; each secretKeyRef from `secrets`; every secret volume
    written as files under root + its mountPath (only the keys its `items` list, at
    their paths, with its defaultMode; with an fsGroup, as the kubelet does, that group
    owns them (as root) and may read them), so a *_FILE variable resolves only if it
    really points into a mount.
    """
    pod = workload["spec"]["template"]["spec"]
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in spec.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        target = root / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for directory in [target, *target.relative_to(root).parents]:
            (root / directory).chmod(0o755)
        items = secret.get("items") or [{"key": k, "path": k} for k in secrets]
        for item in items:
            path = target / item["path"]
            path.write_text(secrets[item["key"]] + "\n", encoding="utf-8")
            mode = secret.get("defaultMode", 0o644)
            if fs_group is not None:  # the kubelet: group fsGroup, group-readable
                mode |= 0o440
                if os.geteuid() == 0:
                    os.chown(path, 0, fs_group)
            path.chmod(mode)
    env: dict[str, str] = {}
    for name, entry in env_of(spec).items():
        if "value" in entry:
            value = str(entry["value"])
            if name.endswith("_FILE"):
                value = str(root / value.lstrip("/"))
            env[name] = value
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", entry
            env[name] = f"{workload['metadata']['name']}-{ordinal}"
        else:
            env[name] = secrets[source["secretKeyRef"]["key"]]
    return env


def dockerfile_version() -> str:
    """The image's org.opencontainers.image.version label, its ${VERSION} resolved."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    label = re.search(r'org\.opencontainers\.image\.version="([^"]*)"', text)
    assert label, "the Dockerfile has no OCI version label"
    value = label.group(1)
    for name in re.findall(r"\$\{(\w+)\}", value):
        default = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
        assert default, f"ARG {name} has no default"
        value = value.replace(f"${{{name}}}", default.group(1))
    return value


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A matchLabels selector selects these labels."""
    return all(labels.get(key) == value for key, value in selector.items())
