"""The SQL loader: numbered migrations without gaps or twins, named queries defined once,
and every name the code asks for defined (a typo fails here, not in production)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import listener.sql as sql_module
from listener.sql import migrations, queries

REPO = Path(__file__).resolve().parents[2]
QUERY_CALL = re.compile(r"""\bquery\(\s*["']([a-z0-9_]+)["']\s*\)""")


def names_used_in_code() -> set[str]:
    used: set[str] = set()
    for folder in ("listener", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            used |= set(QUERY_CALL.findall(path.read_text(encoding="utf-8")))
    return used


def test_every_query_the_code_names_exists() -> None:
    used = names_used_in_code()
    assert len(used) > 20, "the pattern no longer finds the code's query() calls"
    assert used - set(queries()) == set()


def test_every_defined_query_is_used() -> None:
    assert set(queries()) - names_used_in_code() == set()


def test_migrations_are_numbered_one_to_n() -> None:
    versions = [m.version for m in migrations()]
    assert versions == list(range(1, len(versions) + 1))


@pytest.fixture
def sql_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty sql/ tree at tmp_path that the loaders read instead of the real one."""
    (tmp_path / "migrations").mkdir()
    (tmp_path / "queries").mkdir()
    monkeypatch.setattr(sql_module, "sql_root", lambda: tmp_path)
    loaders = (sql_module.migrations, sql_module.queries)
    for loader in loaders:
        loader.cache_clear()
    yield tmp_path
    for loader in loaders:
        loader.cache_clear()


def test_a_gap_or_a_twin_in_the_numbering_is_refused(sql_tree: Path) -> None:
    (sql_tree / "migrations" / "0001_a.sql").write_text("SELECT 1;")
    (sql_tree / "migrations" / "0003_c.sql").write_text("SELECT 3;")
    with pytest.raises(RuntimeError, match="without gaps"):
        sql_module.migrations()
    (sql_tree / "migrations" / "0003_c.sql").rename(sql_tree / "migrations" / "0002_b.sql")
    (sql_tree / "migrations" / "0002_twin.sql").write_text("SELECT 2;")
    sql_module.migrations.cache_clear()
    with pytest.raises(RuntimeError, match="without gaps"):
        sql_module.migrations()


def test_a_query_defined_twice_is_refused(sql_tree: Path) -> None:
    (sql_tree / "queries" / "a.sql").write_text("-- name: same\nSELECT 1\n")
    (sql_tree / "queries" / "b.sql").write_text("-- name: same\nSELECT 2\n")
    with pytest.raises(RuntimeError, match="defined twice"):
        sql_module.queries()
