"""deploy/kubernetes/prometheusrule.yaml is rules.yml, rendered, never edited by hand.

rules.yml is the one source (promtool-tested, tests/deploy/test_promtool.py); the
PrometheusRule is generated from it by `python -m tests.deploy.render_k8s_rules`.
These fail when the two drift apart, and prove the generator loses nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import render_k8s_rules

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
OUTPUT = REPO / "deploy" / "kubernetes" / "prometheusrule.yaml"
COMMAND = "python -m tests.deploy.render_k8s_rules"


def load(path: Path) -> Any:
    """Parse one YAML file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def test_the_checked_in_prometheusrule_is_what_the_generator_renders() -> None:
    """Byte for byte: edit rules.yml, then run the generator (the message says how)."""
    rendered = render_k8s_rules.render(RULES.read_text(encoding="utf-8"))
    assert OUTPUT.read_text(encoding="utf-8") == rendered, (
        f"deploy/kubernetes/prometheusrule.yaml is stale: run `{COMMAND}`"
    )


def test_the_prometheusrule_groups_are_the_rules_file_groups() -> None:
    """Every group, rule, expression, label and annotation, equal after parsing."""
    resource = load(OUTPUT)
    assert resource["apiVersion"] == "monitoring.coreos.com/v1"
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == {"groups": load(RULES)["groups"]}


def test_the_output_says_it_is_generated_and_how() -> None:
    """A reader about to edit it is told where the source is and what to run."""
    head = OUTPUT.read_text(encoding="utf-8").split("\napiVersion:", 1)[0]
    assert "GENERATED" in head
    assert "deploy/prometheus/rules.yml" in head
    assert COMMAND in head


def test_render_round_trips_multi_line_and_quoted_values() -> None:
    """Block scalars, quotes, braces and backslashes come back unchanged."""
    groups = {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {
                        "alert": "A",
                        "expr": 'sum by (job) (x{a="b"})\n  > 0\nor\n  vector(1)',
                        "for": "5m",
                        "annotations": {
                            "description": "{{ $labels.job }}: "
                            + "long text, " * 20
                            + 'with "quotes" and \\"escapes\\"',
                            "summary": "short: with a colon",
                        },
                    }
                ],
            }
        ]
    }
    rendered = yaml.safe_load(render_k8s_rules.render(yaml.safe_dump(groups)))
    assert rendered["spec"] == groups


def test_check_mode_fails_on_drift_and_write_mode_fixes_it(tmp_path: Path) -> None:
    """`--check` exits 1 on a stale file without touching it; without it, it rewrites."""
    rules = tmp_path / "rules.yml"
    output = tmp_path / "prometheusrule.yaml"
    rules.write_text(RULES.read_text(encoding="utf-8"), encoding="utf-8")
    output.write_text("stale\n", encoding="utf-8")
    paths = ["--rules", str(rules), "--output", str(output)]
    assert render_k8s_rules.main(["--check", *paths]) == 1
    assert output.read_text(encoding="utf-8") == "stale\n"
    assert render_k8s_rules.main(paths) == 0
    assert render_k8s_rules.main(["--check", *paths]) == 0
    assert output.read_text(encoding="utf-8") == OUTPUT.read_text(encoding="utf-8")


def test_a_rules_file_without_groups_is_refused() -> None:
    """Rendering an empty or malformed rules file is an error, never an empty resource."""
    with pytest.raises(ValueError, match="groups"):
        render_k8s_rules.render("# nothing\n")
