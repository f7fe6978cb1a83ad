"""Privileges, tried as an attacker: a login role granted token_reset_app, one granted the
listener role, and one with no grants at all, on a real PostgreSQL.

The declared matrix below is the whole truth about who may do what: any function,
table or grant in schema public that it does not list fails the test.
"""

from __future__ import annotations

import json
import uuid

import anyio
import asyncpg
import pytest

from listener.bulk import BulkResetError, run_bulk_reset
from listener.sql import query
from tests.integration.role_support import login_role
from tests.support.database import with_database
from tests.support.env import settings_for
from tests.support.users import add_user

pytestmark = pytest.mark.anyio

APP = "token_reset_app"
LISTENER = "token_reset_listener"
PUBLIC = "PUBLIC"

# (relation, privilege[(column)]) -> roles.  Owner privileges are not listed.
DECLARED_RELATIONS: dict[str, dict[str, set[str]]] = {
    "user_tokens": {
        APP: {"SELECT", "INSERT(user_id)", "INSERT(monthly_token_limit)"},
        LISTENER: {"SELECT"},
    },
    "user_tokens_with_auto_reset": {APP: {"SELECT"}},
    "token_transactions": {APP: {"SELECT"}, LISTENER: {"SELECT"}},
    "token_reset_bulk_runs": {APP: {"SELECT"}, LISTENER: {"SELECT", "INSERT", "UPDATE"}},
    "token_reset_listener_cursors": {LISTENER: {"SELECT", "INSERT", "UPDATE"}},
    "token_reset_settings": {LISTENER: {"SELECT"}},
    "token_reset_bulk_lock": {},
    "token_reset_usage_deltas": {},
    "token_reset_usage": {LISTENER: {"SELECT"}},
    # Usage analytics: the watchdog folds the totals (a definer function) and reads them.
    "token_reset_deduction_totals": {LISTENER: {"SELECT"}},
    "token_reset_deduction_cursor": {},
    "token_reset_refused_deductions": {LISTENER: {"SELECT"}},
    # Sequences: ids are drawn by the owner's functions and column defaults.
    "token_transactions_id_seq": {},
    "token_reset_bulk_runs_id_seq": {},
    "token_reset_declared_privileges": {},
    "token_reset_leases": {LISTENER: {"SELECT", "INSERT", "UPDATE"}},
    "token_reset_migrations": {},
    # Rollover notices: the listener freezes the facts and claims deliveries.
    "token_reset_notices": {LISTENER: {"SELECT", "INSERT", "UPDATE"}},
    "token_reset_notice_deliveries": {LISTENER: {"SELECT", "INSERT", "UPDATE"}},
}
# Routine signature -> roles with EXECUTE.  Everything else is the owner's alone.
DECLARED_ROUTINES: dict[str, set[str]] = {
    # the application's contract
    "deduct_tokens(uuid,bigint,text)": {APP},
    "grant_tokens(uuid,bigint,text)": {APP},
    "set_token_limit(uuid,bigint)": {APP},
    "check_user_tokens(uuid)": {APP},
    "check_token_rate_limit(uuid,bigint)": {APP},
    "reset_user_tokens_if_needed(uuid)": {APP},
    "reset_monthly_tokens_for_all_users()": {APP, LISTENER},
    "auto_reset_monthly_tokens()": {APP},
    # the listener's
    "token_reset_listener_horizon(text[])": {LISTENER},
    "token_reset_bulk_batch(uuid,integer)": {LISTENER},
    "token_reset_bulk_final_pass()": {LISTENER},
    # The previous release's signatures, for replicas still running it mid-deploy.
    "token_reset_bulk_batch(uuid,integer,text)": {LISTENER},
    "token_reset_bulk_final_pass(text)": {LISTENER},
    "token_reset_bulk_pending()": {LISTENER},
    "token_reset_bulk_committing(integer)": {LISTENER},
    "token_reset_sql_run_source(text)": {LISTENER},
    "token_reset_compact_counters()": {LISTENER},
    "token_reset_ensure_partitions(integer)": {LISTENER},
    "token_reset_previous_period_had_usage()": {LISTENER},
    "token_reset_fold_deductions(bigint)": {LISTENER},
    # read-only period arithmetic, for anyone
    "token_reset_period_start()": {PUBLIC},
    "token_reset_period_bound()": {PUBLIC},
    "token_reset_period_label(timestamp with time zone)": {PUBLIC},
    "token_reset_next_period_start()": {PUBLIC},
    "token_reset_zone()": {PUBLIC},
    "token_reset_month_start(timestamp with time zone,text)": {PUBLIC},
    # the owner's alone
    "token_reset_configure(text,boolean)": set(),
    "token_reset_apply_settings()": set(),
    "token_reset_apply_privileges()": set(),
    "token_reset_one_user(uuid,text)": set(),
    "token_reset_clear(uuid[],integer[],text)": set(),
    "token_reset_answer(uuid,integer)": set(),
    "token_reset_checked_amount(bigint,boolean)": set(),
    "token_reset_reset_metadata(text,integer,text)": set(),
    "token_reset_bulk_all(integer)": set(),
    "check_and_reset_monthly_tokens()": set(),
    "token_reset_notify_single()": set(),
    "token_reset_ledger_is_append_only()": set(),
    "token_reset_count_usage()": set(),
    "token_reset_recount_usage()": set(),
    "token_reset_erase_user(uuid)": set(),
    "token_reset_drop_periods(integer,boolean)": set(),
    "token_reset_add_deductions(bigint,bigint,text)": set(),
    "token_reset_require_read_committed(text)": set(),
    "token_reset_recount_deductions(integer,double precision)": set(),
    "token_reset_limit_reached(integer,integer,integer)": set(),
}

ACTUAL_RELATIONS = """
SELECT c.relname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
       a.privilege_type
  FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
 WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm', 'f', 'S')
   AND a.grantee <> c.relowner AND NOT c.relispartition
UNION ALL
SELECT c.relname, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END,
       a.privilege_type || '(' || att.attname || ')'
  FROM pg_class c JOIN pg_attribute att ON att.attrelid = c.oid, aclexplode(att.attacl) a
 WHERE c.relnamespace = 'public'::regnamespace AND att.attacl IS NOT NULL
   AND a.grantee <> c.relowner
"""
ACTUAL_ROUTINES = """
SELECT p.oid::regprocedure::text,
       coalesce(array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
                FILTER (WHERE a.grantee <> p.proowner), '{}')
  FROM pg_proc p
  LEFT JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a ON true
 WHERE p.pronamespace = 'public'::regnamespace
 GROUP BY p.oid
"""


async def test_privileges_are_exactly_the_declared_matrix(conn: asyncpg.Connection) -> None:
    relations: dict[str, dict[str, set[str]]] = {}
    for name in await conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'v', 'p', 'm', 'f', 'S') AND NOT relispartition"
    ):
        relations[name[0]] = {}
    for relname, grantee, privilege in await conn.fetch(ACTUAL_RELATIONS):
        relations[relname].setdefault(grantee, set()).add(privilege)
    assert relations == DECLARED_RELATIONS
    routines = {
        signature.replace(", ", ","): set(grantees)
        for signature, grantees in await conn.fetch(ACTUAL_ROUTINES)
    }
    assert routines == DECLARED_ROUTINES


async def test_ledger_partitions_grant_nothing_of_their_own(conn: asyncpg.Connection) -> None:
    """Roles read the ledger through its parent; a partition is the owner's alone."""
    grants = await conn.fetch(
        "SELECT c.relname, a.grantee::regrole::text, a.privilege_type"
        "  FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a"
        " WHERE c.relispartition AND c.relnamespace = 'public'::regnamespace"
        "   AND a.grantee <> c.relowner"
    )
    assert grants == []
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM pg_inherits WHERE inhparent = 'token_transactions'::regclass"
        )
        >= 5
    )  # default + this period + three ahead


async def test_privileges_are_reapplied_for_roles_created_after_migrating(
    conn: asyncpg.Connection,
) -> None:
    """On managed PostgreSQL the roles may come from a DBA later: the next migrate (which
    runs token_reset_apply_privileges) grants them exactly the declared set."""
    await conn.execute(
        "REVOKE ALL ON FUNCTION deduct_tokens(uuid, bigint, text) FROM token_reset_app"
    )
    assert await conn.fetchval("SELECT token_reset_apply_privileges()") == []
    assert await conn.fetchval(
        "SELECT has_function_privilege('token_reset_app', 'deduct_tokens(uuid,bigint,text)',"
        " 'EXECUTE')"
    )


async def test_the_app_role_writes_usage_only_through_functions(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A login role granted token_reset_app creates users and uses the contract; every
    direct change of usage, limit or reset time is refused, so none can bypass the ledger."""
    stale = await add_user(conn, used=300, stale=True)
    async with login_role(conn, database_url, APP) as url:
        app = await asyncpg.connect(url)
        try:
            fresh = uuid.uuid4()
            await app.execute(
                "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, 900)", fresh
            )
            refused = [
                ("UPDATE user_tokens SET monthly_tokens_used = 0", ()),
                ("UPDATE user_tokens SET monthly_token_limit = 2147483647", ()),
                ("UPDATE user_tokens SET last_monthly_reset = now() WHERE user_id = $1", (stale,)),
                (
                    "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
                    " VALUES ($1, 2147483647, now() - interval '40 days')",
                    (uuid.uuid4(),),
                ),
                (
                    "INSERT INTO user_tokens (user_id) VALUES ($1)"
                    " ON CONFLICT (user_id) DO UPDATE SET monthly_tokens_used = 0",
                    (stale,),
                ),
                ("DELETE FROM user_tokens", ()),
                ("SELECT 1 FROM user_tokens FOR UPDATE", ()),
                (
                    "INSERT INTO token_transactions (user_id, operation, amount)"
                    " VALUES ($1, 'grant', 1)",
                    (stale,),
                ),
                ("UPDATE token_reset_listener_cursors SET last_id = 0", ()),
                (
                    "INSERT INTO token_reset_listener_cursors (consumer, last_id) VALUES ('x', 1)",
                    (),
                ),
                ("SELECT * FROM token_reset_listener_cursors FOR UPDATE", ()),
                ("SELECT * FROM token_reset_bulk_batch(NULL, 10)", ()),
                ("SELECT token_reset_bulk_final_pass()", ()),
                ("SELECT token_reset_bulk_all(10)", ()),
                ("SELECT token_reset_one_user($1, 'x' || repeat('y', 10000))", (stale,)),
                ("SELECT token_reset_configure('UTC')", ()),
                ("SELECT token_reset_apply_privileges()", ()),
                ("CALL token_reset_bulk_committing(10)", ()),
            ]
            for sql, args in refused:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await app.execute(sql, *args)
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with app.transaction():
                    await app.execute("LOCK TABLE token_reset_bulk_lock")
            deducted = json.loads(await app.fetchval("SELECT deduct_tokens($1, 5, 'chat')", stale))
            assert (deducted["used"], deducted["reset"]) == (5, True)
            granted = json.loads(await app.fetchval("SELECT grant_tokens($1, 2, 'refund')", stale))
            assert granted["used"] == 3
            limited = json.loads(await app.fetchval("SELECT set_token_limit($1, 50)", fresh))
            assert (limited["limit"], limited["previous_limit"]) == (50, 900)
            assert (
                json.loads(await app.fetchval("SELECT check_user_tokens($1)", fresh))["used"] == 0
            )
        finally:
            await app.close()
    ledger = await conn.fetch("SELECT operation, amount FROM token_transactions ORDER BY id")
    assert [tuple(r) for r in ledger] == [
        ("reset", 300),
        ("deduct", 5),
        ("grant", 2),
        ("limit", 50),
    ]


async def test_the_listener_role_does_its_work_and_nothing_else(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A login role granted token_reset_listener runs a bulk run, reads the ledger window,
    the horizon, the watchdog and status queries, and may not touch usage."""
    await add_user(conn, used=8, stale=True)
    async with login_role(conn, database_url, LISTENER) as url:
        result = await run_bulk_reset(settings_for(url), source="cli", batch_size=10)
        assert (result.outcome, result.reset_count) == ("success", 1)
        listener = await asyncpg.connect(url)
        try:
            await listener.fetchrow(query("listener_cursor_open"), "replica-1")
            async with listener.transaction():
                await listener.fetch(query("ledger_window"), "replica-1", 0, 10)
            await listener.fetchrow(query("ledger_horizon"), [])
            await listener.fetchrow(query("watchdog_snapshot"))
            await listener.fetchrow(query("status_summary"))
            await listener.execute("CALL token_reset_bulk_committing(10)")
            for sql in (
                "UPDATE user_tokens SET monthly_tokens_used = 0",
                "SELECT deduct_tokens(gen_random_uuid(), 1, 'x')",
                "SELECT token_reset_configure('UTC')",
                "INSERT INTO token_transactions (user_id, operation, amount)"
                " VALUES (gen_random_uuid(), 'grant', 1)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await listener.execute(sql)
        finally:
            await listener.close()


async def test_a_role_with_no_grants_cannot_stall_or_switch_off_the_bulk_backup(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Squatting the advisory keys the bulk code used: the one-transaction run no longer
    waits on them, and a runner that finds its lock held by something that is not a
    recorded run fails loudly instead of answering "skipped" with success."""
    await add_user(conn, used=4, stale=True)
    async with login_role(conn, database_url, None) as url:
        squatter = await asyncpg.connect(url)
        try:
            await squatter.execute(
                "SELECT pg_advisory_lock(hashtext('token_reset.bulk_final_pass'))"
            )
            await squatter.execute("SELECT pg_advisory_lock(hashtext('token_reset.bulk'))")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with squatter.transaction():
                    await squatter.execute("LOCK TABLE token_reset_bulk_lock")
            with anyio.fail_after(10):
                run = json.loads(await conn.fetchval("SELECT reset_monthly_tokens_for_all_users()"))
            assert run["reset_count"] == 1
            with anyio.fail_after(10), pytest.raises(BulkResetError, match="not a recorded"):
                await run_bulk_reset(settings_for(database_url), source="endpoint")
            outcomes = [
                r[0]
                for r in await conn.fetch(
                    "SELECT outcome FROM token_reset_bulk_runs WHERE source = 'endpoint'"
                )
            ]
            assert outcomes == ["failure"]
        finally:
            await squatter.close()


# Operator names and argument types planted as look-alikes in schema public.
PLANTED_OPERATORS = ("=", "<>", "<", "<=", ">", ">=", "+", "-", "||", "->>", "~")
PLANTED_TYPES = (
    "uuid",
    "integer",
    "bigint",
    "smallint",
    "numeric",
    "text",
    "varchar",
    "name",
    "timestamptz",
    "timestamp",
    "date",
    "interval",
    "jsonb",
    "oid",
    "regclass",
    "boolean",
    "text[]",
    "uuid[]",
)
# Functions and aggregates the definer code calls by name, planted with near signatures.
PLANTED_FUNCTIONS = (
    "now()",
    "clock_timestamp()",
    "pg_backend_pid()",
    "gen_random_uuid()",
    "count(uuid)",
    "max(uuid)",
    "min(bigint)",
    "array_agg(varchar)",
    "bool_or(integer)",
    "jsonb_build_object(varchar, varchar)",
    "json_build_object(varchar, varchar)",
    "to_char(timestamp, varchar)",
    "timezone(varchar, timestamptz)",
    "timezone(varchar, timestamp)",
    "date_trunc(varchar, timestamp)",
    "date_trunc(varchar, timestamptz, varchar)",
    "pg_notify(varchar, varchar)",
    "hashtext(varchar)",
    "format(varchar)",
    "current_setting(varchar, boolean)",
    "set_config(varchar, varchar, boolean)",
    "cardinality(uuid[])",
    "unnest(uuid[])",
    "to_date(varchar, varchar)",
    "pg_get_serial_sequence(varchar, varchar)",
    "current_database()",
)


def plant_sql() -> str:
    """DDL for the look-alikes: each records that it ran, then returns NULL."""
    statements = [
        "CREATE TABLE public.hijacked (who text, what text)",
        "GRANT INSERT ON public.hijacked TO PUBLIC",
    ]
    n = 0
    for op in PLANTED_OPERATORS:
        for left in PLANTED_TYPES:
            for right in PLANTED_TYPES:
                n += 1
                fn = f"public.trap_op_{n}"
                what = f"{op}({left},{right})"
                statements.append(
                    f"CREATE FUNCTION {fn}(a {left}, b {right}) RETURNS boolean LANGUAGE plpgsql AS"
                    f" $t$ BEGIN INSERT INTO public.hijacked VALUES (current_user, '{what}');"
                    " RETURN NULL; END $t$"
                )
                statements.append(
                    f"CREATE OPERATOR public.{op} (LEFTARG = {left}, RIGHTARG = {right},"
                    f" FUNCTION = {fn})"
                )
    for signature in PLANTED_FUNCTIONS:
        name, args = signature.split("(", 1)
        params = ", ".join(f"a{i} {t}" for i, t in enumerate(filter(None, args[:-1].split(", "))))
        statements.append(
            f"CREATE FUNCTION public.{name}({params}) RETURNS text LANGUAGE plpgsql AS"
            f" $t$ BEGIN INSERT INTO public.hijacked VALUES (current_user, '{signature}');"
            " RETURN NULL; END $t$"
        )
    statements.append(
        "CREATE FUNCTION public.trap_agg_step(s text, v text) RETURNS text LANGUAGE plpgsql AS"
        " $t$ BEGIN INSERT INTO public.hijacked VALUES (current_user, 'aggregate');"
        " RETURN s; END $t$"
    )
    statements.append(
        "CREATE AGGREGATE public.array_agg(text) (SFUNC = public.trap_agg_step, STYPE = text)"
    )
    return ";\n".join(statements)


# How the test exercises each SECURITY DEFINER routine (and the role it calls it as).
# The set of keys must equal the catalog's: a new definer function without a call here
# fails the test until someone decides how an attacker would reach it.
DEFINER_CALLS: dict[str, tuple[str, str]] = {
    "deduct_tokens(uuid,bigint,text)": (APP, "SELECT deduct_tokens($1, 3, 'chat')"),
    "grant_tokens(uuid,bigint,text)": (APP, "SELECT grant_tokens($1, 1, 'refund')"),
    "set_token_limit(uuid,bigint)": (APP, "SELECT set_token_limit($1, 700)"),
    "check_user_tokens(uuid)": (APP, "SELECT check_user_tokens($1)"),
    "check_token_rate_limit(uuid,bigint)": (APP, "SELECT check_token_rate_limit($1, 2)"),
    "reset_user_tokens_if_needed(uuid)": (APP, "SELECT reset_user_tokens_if_needed($1)"),
    "reset_monthly_tokens_for_all_users()": (APP, "SELECT reset_monthly_tokens_for_all_users()"),
    "auto_reset_monthly_tokens()": (APP, "SELECT auto_reset_monthly_tokens()"),
    "token_reset_listener_horizon(text[])": (
        LISTENER,
        "SELECT * FROM token_reset_listener_horizon('{}')",
    ),
    "token_reset_bulk_batch(uuid,integer)": (
        LISTENER,
        "SELECT * FROM token_reset_bulk_batch(NULL, 2)",
    ),
    "token_reset_bulk_final_pass()": (LISTENER, "SELECT token_reset_bulk_final_pass()"),
    "token_reset_bulk_batch(uuid,integer,text)": (
        LISTENER,
        "SELECT * FROM token_reset_bulk_batch(NULL, 2, 'bulk')",
    ),
    "token_reset_bulk_final_pass(text)": (LISTENER, "SELECT token_reset_bulk_final_pass('bulk')"),
    "token_reset_bulk_pending()": (LISTENER, "SELECT token_reset_bulk_pending()"),
    # Reached through the calls above (deduct_tokens, the bulk functions, UPDATEs).
    "token_reset_one_user(uuid,text)": (APP, "SELECT reset_user_tokens_if_needed($1)"),
    "token_reset_answer(uuid,integer)": (APP, "SELECT check_user_tokens($1)"),
    "token_reset_bulk_all(integer)": (APP, "SELECT reset_monthly_tokens_for_all_users()"),
    "check_and_reset_monthly_tokens()": (APP, "SELECT deduct_tokens($1, 1, 'chat')"),
    "token_reset_count_usage()": (
        APP,
        "INSERT INTO user_tokens (user_id) VALUES (gen_random_uuid())",
    ),
    "token_reset_compact_counters()": (LISTENER, "SELECT token_reset_compact_counters()"),
    "token_reset_ensure_partitions(integer)": (LISTENER, "SELECT token_reset_ensure_partitions(5)"),
    "token_reset_previous_period_had_usage()": (
        LISTENER,
        "SELECT token_reset_previous_period_had_usage()",
    ),
    "token_reset_fold_deductions(bigint)": (LISTENER, "SELECT token_reset_fold_deductions()"),
}


async def test_no_definer_code_resolves_anything_a_non_owner_can_create(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """Where PUBLIC may CREATE in schema public (the default before PostgreSQL 15, kept by
    every database upgraded from one), a role with no grants plants look-alike operators,
    functions and an aggregate of exact argument types.  Every SECURITY DEFINER routine,
    found from the catalog, is then called by the roles that may call it: none of the
    planted objects may ever run, and none may be needed for the calls to work."""
    definers = {
        row[0].replace(", ", ","): row[1]
        for row in await conn.fetch(
            "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p"
            " WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef"
        )
    }
    assert set(definers) == set(DEFINER_CALLS)
    for signature, config in definers.items():
        assert config[0] == "search_path=pg_catalog, pg_temp", signature
        # The only other setting: the partition DDL's lock timeout.
        assert set(config[1:]) <= {"lock_timeout=2s"}, signature
    await conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
    async with (
        login_role(conn, database_url, None) as attacker_url,
        login_role(conn, database_url, APP) as app_url,
        login_role(conn, database_url, LISTENER) as listener_url,
    ):
        attacker = await asyncpg.connect(attacker_url)
        try:
            await attacker.execute(plant_sql())
        finally:
            await attacker.close()
        user = await add_user(conn, used=60, stale=True)
        for _ in range(3):
            await add_user(conn, used=9, stale=True)
        urls = {APP: app_url, LISTENER: listener_url}
        for signature, (role, sql) in DEFINER_CALLS.items():
            caller = await asyncpg.connect(urls[role])
            try:
                # A caller's own temporary tables named like ours must not be read either.
                await caller.execute(
                    "CREATE TEMP TABLE user_tokens (user_id uuid, monthly_tokens_used int,"
                    " monthly_token_limit int, last_monthly_reset timestamptz);"
                    "CREATE TEMP TABLE token_transactions (id bigint, user_id uuid,"
                    " operation text, amount int, metadata jsonb);"
                    "CREATE TEMP TABLE token_reset_settings (timezone text,"
                    " notify_per_write boolean)"
                )
                args = (user,) if "$1" in sql else ()
                await caller.execute(sql, *args)
            except asyncpg.PostgresError as exc:
                raise AssertionError(f"{signature} failed among planted objects: {exc}") from exc
            finally:
                await caller.close()
        await conn.execute("UPDATE user_tokens SET updated_at = now()")  # the trigger, as owner
        assert await conn.fetch("SELECT who, what FROM public.hijacked") == []
        assert not await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
            attacker_url.split("://")[1].split("@")[0],
        )
    assert (
        await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'reset'")
        == 4
    )


async def test_the_test_server_url_names_the_superuser(database_url: str) -> None:
    """login_role() derives role URLs from it; say so plainly if a server breaks that."""
    assert "://postgres@" in with_database(database_url, "x")
