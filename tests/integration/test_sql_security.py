"""Privileges: definer functions pin search_path; the app role can use, not rewrite, history."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.factories import add_user

pytestmark = pytest.mark.anyio


async def test_every_security_definer_function_pins_search_path(
    conn: asyncpg.Connection,
) -> None:
    """A SECURITY DEFINER function without a pinned search_path can be hijacked."""
    unpinned = await conn.fetch(
        "SELECT p.oid::regprocedure::text FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef"
        "   AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c"
        "                   WHERE c LIKE 'search_path=pg_catalog%')"
    )
    assert unpinned == []
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND prosecdef"
        )
        > 0
    )


async def test_public_cannot_execute_the_functions(conn: asyncpg.Connection) -> None:
    """EXECUTE is revoked from PUBLIC on every function that writes."""
    open_to_public = await conn.fetch(
        "SELECT p.proname FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace"
        "   AND p.proname IN ('deduct_tokens', 'reset_monthly_tokens_for_all_users',"
        "                     'token_reset_bulk_batch', 'token_reset_one_user')"
        "   AND has_function_privilege('public', p.oid, 'EXECUTE')"
    )
    assert open_to_public == []


async def test_app_role_deducts_but_cannot_forge_or_rewrite_the_ledger(
    conn: asyncpg.Connection,
) -> None:
    """token_reset_app calls the functions; direct ledger writes are refused."""
    user = await add_user(conn, used=77, stale=True)
    await conn.execute("SET ROLE token_reset_app")
    try:
        result = json.loads(await conn.fetchval("SELECT deduct_tokens($1, 5, 'chat')", user))
        assert result["used"] == 5
        assert (
            await conn.fetchval(
                "SELECT monthly_tokens_used FROM user_tokens_with_auto_reset WHERE user_id = $1",
                user,
            )
            == 5
        )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO token_transactions (user_id, operation, amount, metadata)"
                " VALUES ($1, 'grant', 1000, '{}')",
                user,
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT token_reset_configure('UTC')")
        # Writes through the trigger still reach the ledger: the trigger runs as owner.
        await conn.execute(
            "UPDATE user_tokens SET monthly_tokens_used = 1 WHERE user_id = $1", user
        )
    finally:
        await conn.execute("RESET ROLE")
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == 2
