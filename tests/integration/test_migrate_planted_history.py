"""A history table planted by another role is refused, never written into.

Where PUBLIC may CREATE in schema public (databases from before PostgreSQL 15), a role
with no grants could create public.token_reset_migrations before the first migrate,
with a trigger that made it superuser when migrate inserted its history rows.
"""

from __future__ import annotations

import asyncpg
import pytest

from listener.migrate import MigrationError, apply_migrations
from tests.integration.role_support import login_role

pytestmark = pytest.mark.anyio

PLANT = """
CREATE TABLE public.token_reset_migrations (version integer PRIMARY KEY, name text NOT NULL,
    checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION public.planted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('ALTER ROLE %I SUPERUSER', session_user);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER planted AFTER INSERT ON public.token_reset_migrations
    FOR EACH ROW EXECUTE FUNCTION public.planted();
GRANT ALL ON public.token_reset_migrations TO PUBLIC;
"""


async def test_a_planted_history_table_is_refused(empty_database_url: str) -> None:
    owner = await asyncpg.connect(empty_database_url)
    try:
        await owner.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        async with login_role(owner, empty_database_url, None) as attacker_url:
            attacker = await asyncpg.connect(attacker_url)
            try:
                await attacker.execute(PLANT)
                name = await attacker.fetchval("SELECT current_user")
            finally:
                await attacker.close()
            with pytest.raises(MigrationError, match="owned by"):
                await apply_migrations(owner)
            assert not await owner.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1", name
            )
            assert await owner.fetchval("SELECT count(*) FROM public.token_reset_migrations") == 0
    finally:
        await owner.close()
