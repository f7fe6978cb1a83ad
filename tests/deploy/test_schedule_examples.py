"""Every schedule example (the built-in default, Vercel, pg_cron, Kubernetes) says the same.

An operator copies whichever example fits their platform; if one of them ran at another
time than the built-in schedule, the "a few minutes after the period boundary" promise
would hold for some deployments and not others.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from listener.config import Settings
from listener.slots import DEFAULT_SCHEDULE

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")


def yaml_blocks(text: str) -> list[Any]:
    """Every ```yaml block of a Markdown text, parsed."""
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]


def test_the_built_in_default_is_the_documented_expression() -> None:
    """Settings' default and the README's configuration row agree on `5 0 * * *`."""
    assert Settings.from_env({}).reset_schedule == DEFAULT_SCHEDULE == "5 0 * * *"
    row = next(line for line in README.splitlines() if line.startswith("| `RESET_SCHEDULE`"))
    assert row.split("|")[2].strip() == f"`{DEFAULT_SCHEDULE}`"


def test_vercel_cron_uses_the_default_expression() -> None:
    """deploy/vercel.json calls the endpoint on the same expression (Vercel reads it in UTC)."""
    crons = json.loads((REPO / "deploy" / "vercel.json").read_text(encoding="utf-8"))["crons"]
    assert [c["schedule"] for c in crons] == [DEFAULT_SCHEDULE]


def test_pg_cron_examples_use_the_default_expression_and_say_how_to_set_the_zone() -> None:
    """Every `cron.schedule(...)` in the README uses it; `cron.timezone` is explained."""
    expressions = re.findall(r"cron\.schedule\((?:'[^']*',\s*)?'([^']+)',\s*'CALL", README)
    assert expressions
    assert set(expressions) == {DEFAULT_SCHEDULE}
    assert "cron.timezone" in README


def test_the_kubernetes_cronjob_example_uses_the_default_expression_in_the_period_zone() -> None:
    """The README's CronJob runs `token-reset reset` on it, with `timeZone` set."""
    jobs = [b for b in yaml_blocks(README) if isinstance(b, dict) and b.get("kind") == "CronJob"]
    assert len(jobs) == 1
    spec = jobs[0]["spec"]
    assert spec["schedule"] == DEFAULT_SCHEDULE
    assert spec["timeZone"]
    container = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["reset"]
