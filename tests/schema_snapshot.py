"""sql/schema.sql: the current definition of every object, rendered from a fresh migration.

The migrations are the history; this file is for readers (what does deduct_tokens do
*now*?).  A test renders it again from the migrated template and fails when the two
differ, so it cannot drift.  Regenerate with::

    .venv/bin/python -m tests.schema_snapshot

(TEST_DATABASE_URL, or an embedded server it starts.)  Dated ledger partitions depend
on the day it runs and are left out; the DEFAULT partition and the parent are in.
"""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
import asyncpg

from listener.embedded import private_data_root
from listener.migrate import apply_migrations
from tests.support.database import test_server, unique_name

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "sql" / "schema.sql"
HEADER = """\
-- sql/schema.sql: GENERATED from a fresh `token-reset migrate` by
-- `python -m tests.schema_snapshot`; tests fail when it differs.  Do not edit: change
-- the schema with a new migration in sql/migrations/, then regenerate this file.
-- Objects in schema public, grouped by kind, each group in name order.
-- Rendered on PostgreSQL {major} (other versions print views differently).
"""

VIEWS_HEADING = "\n-- -------------------------------------------------------------- views ---\n"
ROUTINES_HEADING = "\n-- ----------------------------------------------------------- routines ---\n"

_TABLES = """
SELECT c.relname, c.relkind, c.relispartition,
       pg_get_expr(c.relpartbound, c.oid) AS bound,
       pg_get_partkeydef(c.oid) AS partkey,
       array_to_string(c.reloptions, ', ') AS options
  FROM pg_class c
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')
   AND (NOT c.relispartition OR pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT')
 ORDER BY c.relname
"""
_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid) AS default,
       -- "char" arrives as bytes (b'\\x00' when none): compare it as text in SQL
       a.attidentity::text AS attidentity
  FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""
_CONSTRAINTS = """
SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
 WHERE conrelid = $1::regclass AND coninhcount = 0 ORDER BY conname
"""
_INDEXES = """
SELECT i.indexname, i.indexdef FROM pg_indexes i
 JOIN pg_class c ON c.relname = i.indexname AND c.relnamespace = 'public'::regnamespace
 JOIN pg_index x ON x.indexrelid = c.oid
 JOIN pg_class t ON t.oid = x.indrelid
 WHERE i.schemaname = 'public' AND NOT x.indisprimary
   AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid)
   AND (NOT t.relispartition OR pg_get_expr(t.relpartbound, t.oid) = 'DEFAULT')
   AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = c.oid)
 ORDER BY i.indexname
"""
_VIEWS = """
SELECT viewname, pg_get_viewdef(format('public.%I', viewname)::regclass, true)
  FROM pg_views WHERE schemaname = 'public' ORDER BY viewname
"""
_ROUTINES = """
SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
  FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
 ORDER BY p.proname, p.oid::regprocedure::text
"""
_TRIGGERS = """
SELECT t.tgname, c.relname, pg_get_triggerdef(t.oid, true)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
   AND t.tgparentid = 0
 ORDER BY c.relname, t.tgname
"""
_PRIVILEGES = """
SELECT grantee, kind, object, privilege FROM public.token_reset_declared_privileges
 ORDER BY grantee, kind, object, privilege
"""


async def render(conn: asyncpg.Connection) -> str:
    """The schema as text; the same database always renders the same bytes."""
    major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    out = [HEADER.format(major=major)]
    out.append("\n-- ------------------------------------------------------------- tables ---\n")
    for table in await conn.fetch(_TABLES):
        name = f"public.{table['relname']}"
        lines = []
        for col in await conn.fetch(_COLUMNS, name):
            line = f"    {col['attname']} {col['type']}"
            if col["attidentity"] in ("a", "d"):
                kind = "ALWAYS" if col["attidentity"] == "a" else "BY DEFAULT"
                line += f" GENERATED {kind} AS IDENTITY"
            elif col["default"] is not None:
                line += f" DEFAULT {col['default']}"
            if col["attnotnull"]:
                line += " NOT NULL"
            lines.append(line)
        for conname, definition in await conn.fetch(_CONSTRAINTS, name):
            lines.append(f"    CONSTRAINT {conname} {definition}")
        head = f"CREATE TABLE {name}"
        if table["relispartition"]:
            out.append(f"{head} PARTITION OF public.token_transactions {table['bound']};\n")
            continue
        tail = f" PARTITION BY {table['partkey']}" if table["partkey"] else ""
        if table["options"]:
            tail += f" WITH ({table['options']})"
        out.append(f"{head} (\n" + ",\n".join(lines) + f"\n){tail};\n")
    out.append("\n-- ------------------------------------------------------------ indexes ---\n")
    out.extend(f"{definition};\n" for _, definition in await conn.fetch(_INDEXES))
    out.append(VIEWS_HEADING)
    out.extend(
        f"CREATE VIEW public.{name} AS\n{definition}\n"
        for name, definition in await conn.fetch(_VIEWS)
    )
    out.append(ROUTINES_HEADING)
    out.extend(f"{definition.rstrip()};\n\n" for _, definition in await conn.fetch(_ROUTINES))
    out.append("-- ----------------------------------------------------------- triggers ---\n")
    out.extend(f"{definition};\n" for _, _, definition in await conn.fetch(_TRIGGERS))
    out.append("\n-- ------------------------------------------------ declared privileges ---\n")
    out.append("-- (grantee, kind, object, privilege): token_reset_declared_privileges\n")
    out.extend(
        f"-- {r['grantee']} | {r['kind']} | {r['object']} | {r['privilege']}\n"
        for r in await conn.fetch(_PRIVILEGES)
    )
    return "".join(out)


async def _snapshot() -> str:
    with private_data_root() as root, test_server(root) as server:
        name = unique_name("tr_schema")
        url = await server.create_database(name)
        try:
            conn = await asyncpg.connect(url)
            try:
                await apply_migrations(conn)
                return await render(conn)
            finally:
                await conn.close()
        finally:
            await server.drop_database(name)


def main() -> int:
    SCHEMA_FILE.write_text(anyio.run(_snapshot), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
