"""Render deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/rules.yml.

    python -m tests.deploy.render_k8s_rules           # (re)write it
    python -m tests.deploy.render_k8s_rules --check   # exit 1 when it is stale

rules.yml stays the one source of the alert rules (promtool-tested); the
prometheus-operator's PrometheusRule carries the same groups under `spec.groups`.
tests/deploy/test_kubernetes_rules.py fails when the checked-in file is not what this
renders, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
OUTPUT = REPO / "deploy" / "kubernetes" / "prometheusrule.yaml"
COMMAND = "python -m tests.deploy.render_k8s_rules"

HEADER = f"""\
# GENERATED from deploy/prometheus/rules.yml: do not edit. Change rules.yml
# (promtool tests its rules) and run `{COMMAND}`;
# tests/deploy/test_kubernetes_rules.py fails while the two differ.
#
# A prometheus-operator Prometheus loads the PrometheusRules its ruleSelector selects:
# add the label yours selects (kube-prometheus-stack: `release: <its release name>`)
# with kustomize (deploy/kubernetes/kustomization.yaml), not here. Its alerts select
# job="token-reset": servicemonitor.yaml gives the scrape that job name.
"""

METADATA = {
    "name": "token-reset",
    "labels": {
        "app.kubernetes.io/name": "token-reset",
        "app.kubernetes.io/part-of": "monthly-token-reset",
    },
}

# Strings longer than this are written folded (`>-`), multi-line ones literal (`|-`).
_FOLD_AT = 80


class _Dumper(yaml.SafeDumper):
    """Block style, list items indented under their key, no anchors or aliases."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None
    if "\n" in value:
        style = "|"
    elif len(value) > _FOLD_AT and value == value.strip() and "  " not in value:
        style = ">"
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(rules_text: str) -> str:
    """The PrometheusRule manifest whose spec.groups are rules.yml's groups."""
    rules = yaml.safe_load(rules_text)
    if not isinstance(rules, dict) or not isinstance(rules.get("groups"), list):
        raise ValueError("the rules file has no `groups:` list")  # noqa: TRY004  # bad content
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": METADATA,
        "spec": {"groups": rules["groups"]},
    }
    body = yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    rendered = HEADER + body
    if yaml.safe_load(rendered) != resource:  # the emitter must lose nothing
        raise ValueError("the rendered PrometheusRule does not parse back to rules.yml")
    return rendered


def main(argv: Sequence[str] | None = None) -> int:
    """Write the PrometheusRule, or with --check report whether it is up to date."""
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the output is stale")
    parser.add_argument("--rules", type=Path, default=RULES, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=OUTPUT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rendered = render(args.rules.read_text(encoding="utf-8"))
    current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    if args.check:
        if current != rendered:
            print(f"{args.output} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if current != rendered:
        args.output.write_text(rendered, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
