"""sql/schema.sql is the current schema: rendered again from the migrated template, it
must be byte for byte the checked-in file (regenerate: python -m tests.schema_snapshot)."""

from __future__ import annotations

import re

import asyncpg
import pytest

from tests.schema_snapshot import ROUTINES_HEADING, SCHEMA_FILE, VIEWS_HEADING, render

pytestmark = pytest.mark.anyio


def without_views(text: str) -> str:
    """Views print differently across major versions; everything else must not."""
    start, end = text.index(VIEWS_HEADING), text.index(ROUTINES_HEADING)
    return re.sub(r"-- Rendered on PostgreSQL \d+", "", text[:start] + text[end:])


async def test_schema_sql_is_what_the_migrations_make(conn: asyncpg.Connection) -> None:
    rendered = await render(conn)
    checked_in = SCHEMA_FILE.read_text(encoding="utf-8")
    hint = "sql/schema.sql is stale: run `.venv/bin/python -m tests.schema_snapshot`"
    if rendered.splitlines()[4] == checked_in.splitlines()[4]:  # "Rendered on PostgreSQL N"
        assert rendered == checked_in, hint
    else:
        assert without_views(rendered) == without_views(checked_in), hint


async def test_columns_are_rendered_as_the_catalog_has_them(conn: asyncpg.Connection) -> None:
    """Identity only where the catalog says identity; a default wherever one exists."""
    rendered = await render(conn)
    identities = await conn.fetchval(
        "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " WHERE c.relnamespace = 'public'::regnamespace AND a.attidentity <> ''"
        "   AND NOT c.relispartition AND c.relkind IN ('r', 'p')"
    )
    assert rendered.count("AS IDENTITY") == identities
    assert "monthly_tokens_used integer DEFAULT 0 NOT NULL" in rendered
