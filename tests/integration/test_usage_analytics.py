"""Usage analytics: the exported numbers equal what SQL over the ledger and user_tokens
says, after random traffic, across restarts, and at the month boundary.

The watchdog runs as the listener role (its grants are part of what is tested); the
traffic runs as the application role, through the functions it is given.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from listener.commands.status import gather_status
from listener.metrics import Metrics
from listener.migrate import apply_migrations
from listener.watchdog import Watchdog
from tests.integration.role_support import login_role
from tests.integration.test_ledger_model import COUNTER_DRIFT
from tests.support.env import settings_for
from tests.support.metrics import sample
from tests.support.users import LAST_MONTH_28TH, add_stale_users, add_user
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

FEATURES = [f"feature-{n:02d}" for n in range(14)] + [None]

# This period's deductions by feature, as the ledger says (the truth the metric must equal).
LEDGER_TOKENS = """
SELECT coalesce(feature, '(none)') AS feature, sum(amount)::bigint AS tokens
  FROM token_transactions
 WHERE operation = 'deduct'
   AND coalesce(metadata ->> 'period', period) = token_reset_period_label(now())
 GROUP BY 1
"""
# Users of this period at or above a share of their limit, from user_tokens itself.
USERS_AT_SHARE = """
SELECT count(*) FROM user_tokens
 WHERE last_monthly_reset >= token_reset_period_start() AND monthly_tokens_used > 0
   AND monthly_tokens_used::numeric >= monthly_token_limit * $1::numeric
"""


@pytest.fixture
async def app(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[asyncpg.Connection]:
    async with login_role(conn, database_url, "token_reset_app") as url:
        session = await asyncpg.connect(url)
        try:
            yield session
        finally:
            await session.close()


@pytest.fixture
async def listener_url(conn: asyncpg.Connection, database_url: str) -> AsyncIterator[str]:
    async with login_role(conn, database_url, "token_reset_listener") as url:
        yield url


async def check(listener_url: str) -> Metrics:
    """One watchdog check, in a fresh process's metrics (as after a restart)."""
    watchdog = Watchdog(settings_for(listener_url), Metrics.fresh())
    try:
        assert await watchdog.check_once() is not None, "the watchdog could not read"
    finally:
        watchdog.close()
    return watchdog.metrics


def exported_tokens(metrics: Metrics) -> dict[str, float]:
    """token_reset_period_tokens_deducted, by feature label."""
    return {
        sample_.labels["feature"]: sample_.value
        for family in metrics.registry.collect()
        if family.name == "token_reset_period_tokens_deducted"
        for sample_ in family.samples
    }


def top_and_other(truth: dict[str, int], top: int = 10) -> dict[str, int]:
    """The ten largest features by name, the rest summed as "other" (always present)."""
    ranked = sorted(truth.items(), key=lambda item: (-item[1], item[0]))
    expected = dict(ranked[:top])
    expected["other"] = expected.get("other", 0) + sum(tokens for _, tokens in ranked[top:])
    return expected


async def assert_metrics_equal_sql(
    conn: asyncpg.Connection, metrics: Metrics, refused: int
) -> None:
    truth = {row["feature"]: row["tokens"] for row in await conn.fetch(LEDGER_TOKENS)}
    assert exported_tokens(metrics) == top_and_other(truth)
    assert sum(exported_tokens(metrics).values()) == sum(truth.values())
    for threshold, share in (("0.8", "0.8"), ("1", "1")):
        assert sample(metrics, "token_reset_users_near_limit", threshold=threshold) == (
            await conn.fetchval(USERS_AT_SHARE, share)
        ), threshold
    assert sample(metrics, "token_reset_deductions_refused_total") == refused
    assert await conn.fetch(COUNTER_DRIFT) == []


async def test_usage_metrics_equal_sql_after_random_traffic_and_restarts(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """Deductions (some refused), refunds, limit changes, resets on write and in bulk, and
    last period's users and ledger moved in behind them: after every few steps a freshly
    started watchdog (a restart: nothing in memory) exports what SQL says."""
    rng = random.Random(20261130)
    # Last period: users carrying its usage and deductions recorded in its partition.
    stale = await add_stale_users(conn, 12, used=90)
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata, period,"
        f" created_at) SELECT user_id, 'deduct', 'feature-00', 90,"
        f" jsonb_build_object('period', token_reset_period_label({LAST_MONTH_28TH})),"
        f" token_reset_period_label({LAST_MONTH_28TH}), {LAST_MONTH_28TH}"
        " FROM user_tokens WHERE user_id = ANY($1)",
        stale,
    )
    users = list(stale)
    for _ in range(18):
        user = uuid.uuid4()
        await app.execute(
            "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, $2)",
            user,
            rng.choice([0, 50, 100, 500]),
        )
        users.append(user)
    refused = 0
    for step in range(300):
        user = rng.choice(users)
        kind = rng.choices(["deduct", "grant", "limit", "touch", "bulk"], [70, 8, 12, 6, 1])[0]
        try:
            if kind == "deduct":
                await app.fetchval(
                    "SELECT deduct_tokens($1, $2, $3)",
                    user,
                    rng.randint(1, 60),
                    rng.choice(FEATURES),
                )
            elif kind == "grant":
                await app.fetchval(
                    "SELECT grant_tokens($1, $2, 'refund')", user, rng.randint(1, 20)
                )
            elif kind == "limit":
                await app.fetchval(
                    "SELECT set_token_limit($1, $2)", user, rng.choice([40, 100, 300])
                )
            elif kind == "touch":  # the owner's own write: the BEFORE trigger's reset path
                await conn.execute(
                    "UPDATE user_tokens SET updated_at = now() WHERE user_id = $1", user
                )
            else:
                await app.fetchval("SELECT reset_monthly_tokens_for_all_users()")
        except asyncpg.CheckViolationError:  # 23514: over the allowance (or the usage)
            refused += kind == "deduct"
        if step % 60 == 59:
            await assert_metrics_equal_sql(conn, await check(listener_url), refused)
    assert refused > 10, "the traffic should hit the allowance often"
    await assert_metrics_equal_sql(conn, await check(listener_url), refused)
    # Last period's deductions are history: they never count in this period's total.
    assert sum(exported_tokens(await check(listener_url)).values()) < await conn.fetchval(
        "SELECT sum(amount) FROM token_transactions WHERE operation = 'deduct'"
    )


async def test_a_deduction_still_open_at_a_check_counts_once_it_commits(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str, database_url: str
) -> None:
    """Ledger ids become visible in commit order: the fold must not pass an id whose
    transaction is still open, or that deduction would never be counted."""
    early, late = uuid.uuid4(), uuid.uuid4()
    for user in (early, late):
        await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    async with login_role(conn, database_url, "token_reset_app") as url:
        holder = await asyncpg.connect(url)
        try:
            txn = holder.transaction()
            await txn.start()
            await holder.fetchval("SELECT deduct_tokens($1, 7, 'slow')", early)  # smaller id
            await app.fetchval("SELECT deduct_tokens($1, 5, 'fast')", late)  # larger, committed
            during = exported_tokens(await check(listener_url))
            await txn.commit()
        finally:
            await holder.close()
    assert during.get("slow", 0) == 0
    after = exported_tokens(await check(listener_url))
    assert (after["slow"], after["fast"]) == (7, 5)
    assert await conn.fetchval("SELECT sum(deductions) FROM token_reset_deduction_totals") == 2, (
        "each deduction folded exactly once"
    )


async def test_a_refusal_is_counted_although_its_transaction_rolls_back(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    user = uuid.uuid4()
    await app.execute(
        "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, 10)", user
    )
    ledger_before = await conn.fetchval("SELECT count(*) FROM token_transactions")
    for _ in range(3):
        with pytest.raises(asyncpg.CheckViolationError):
            async with app.transaction():
                await app.fetchval("SELECT deduct_tokens($1, 11, 'big')", user)
    with pytest.raises(asyncpg.InvalidParameterValueError):  # not an allowance refusal
        await app.fetchval("SELECT deduct_tokens($1, 0, 'zero')", user)
    assert await conn.fetchval("SELECT count(*) FROM token_transactions") == ledger_before
    metrics = await check(listener_url)
    assert sample(metrics, "token_reset_deductions_refused_total") == 3


async def test_features_beyond_the_ten_largest_are_other_and_series_follow_the_top(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """Bounded cardinality: eleven features give ten series and "other"; a feature that
    leaves the ten largest loses its series at the next check."""
    user = uuid.uuid4()
    await app.execute(
        "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, 1000000)", user
    )
    for n in range(11):
        await app.fetchval("SELECT deduct_tokens($1, $2, $3)", user, 100 + n, f"f{n:02d}")
    watchdog = Watchdog(settings_for(listener_url), Metrics.fresh())
    try:
        await watchdog.check_once()
        first = exported_tokens(watchdog.metrics)
        await app.fetchval("SELECT deduct_tokens($1, 500, 'f00')", user)
        await watchdog.check_once()
        second = exported_tokens(watchdog.metrics)
    finally:
        watchdog.close()
    assert first == {**{f"f{n:02d}": 100 + n for n in range(1, 11)}, "other": 100}
    assert "f01" not in second
    assert (second["f00"], second["other"]) == (600, 101)
    assert len(second) == 11


async def test_the_fold_refuses_a_snapshot_isolation_that_would_skip_rows(
    listener_url: str,
) -> None:
    listener = await asyncpg.connect(listener_url)
    try:
        with pytest.raises(asyncpg.InvalidTransactionStateError):
            async with listener.transaction(isolation="repeatable_read"):
                await listener.fetchval("SELECT token_reset_fold_deductions()")
    finally:
        await listener.close()


async def test_the_app_role_cannot_fold_or_write_the_totals(
    app: asyncpg.Connection,
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app.fetchval("SELECT token_reset_fold_deductions()")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app.execute(
            "INSERT INTO token_reset_deduction_totals (period, feature, tokens)"
            " VALUES ('2026-11', 'x', 1)"
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app.fetchval("SELECT nextval('token_reset_refused_deductions')")


async def test_a_recount_rebuilds_the_totals_from_the_ledger(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """After ledger rows were loaded with the triggers off (or to prove the totals)."""
    user = uuid.uuid4()
    await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    for feature in ("a", "b", "a"):
        await app.fetchval("SELECT deduct_tokens($1, 4, $2)", user, feature)
    folded = exported_tokens(await check(listener_url))
    await conn.execute("DELETE FROM token_reset_deduction_totals")
    await conn.fetchval("SELECT token_reset_recount_deductions()")
    assert exported_tokens(await check(listener_url)) == folded == {"a": 8, "b": 4, "other": 0}
    assert Counter(
        dict(await conn.fetch("SELECT feature, deductions FROM token_reset_deduction_totals"))
    ) == Counter({"a": 2, "b": 1})


async def test_a_follower_replica_exports_the_lease_holders_analytics(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """Only the lease holder folds and reads; the other replicas export what it shared,
    so every replica shows the same numbers."""
    user = uuid.uuid4()
    await app.execute(
        "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, 10)", user
    )
    await app.fetchval("SELECT deduct_tokens($1, 9, 'chat')", user)
    with pytest.raises(asyncpg.CheckViolationError):
        await app.fetchval("SELECT deduct_tokens($1, 5, 'chat')", user)
    holder, follower = (
        Watchdog(settings_for(listener_url, listener_name=name), Metrics.fresh())
        for name in ("replica-a", "replica-b")
    )
    try:
        await holder.check_once()
        await follower.check_once()
    finally:
        holder.close()
        follower.close()
    assert (holder.led_checks, follower.led_checks) == (1, 0)
    for watchdog in (holder, follower):
        assert exported_tokens(watchdog.metrics) == {"chat": 9, "other": 0}
        assert sample(watchdog.metrics, "token_reset_users_near_limit", threshold="0.8") == 1
        assert sample(watchdog.metrics, "token_reset_users_near_limit", threshold="1") == 0
        assert sample(watchdog.metrics, "token_reset_deductions_refused_total") == 1


async def test_status_says_what_the_near_limit_gauge_says(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    for used in (5, 8, 10):  # of a limit of 10: below, at 80 %, at 100 %
        user = uuid.uuid4()
        await app.execute(
            "INSERT INTO user_tokens (user_id, monthly_token_limit) VALUES ($1, 10)", user
        )
        await app.fetchval("SELECT deduct_tokens($1, $2, 'chat')", user, used)
    status = await gather_status(conn)
    metrics = await check(listener_url)
    assert status["users_near_limit_this_period"] == 2
    assert status["users_at_limit_this_period"] == 1
    assert sample(metrics, "token_reset_users_near_limit", threshold="0.8") == 2
    assert sample(metrics, "token_reset_users_near_limit", threshold="1") == 1


async def test_two_replicas_folding_at_once_count_each_deduction_once(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """During a lease handover two replicas may fold at the same moment: they take turns
    on the cursor row, and every deduction is in the totals exactly once."""
    users = [uuid.uuid4() for _ in range(40)]
    for user in users:
        await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    replicas = [await asyncpg.connect(listener_url) for _ in range(2)]
    try:
        for round_ in range(5):
            for user in users:
                await app.fetchval("SELECT deduct_tokens($1, 1, $2)", user, f"f{round_}")
            async with anyio.create_task_group() as tg:
                for replica in replicas:
                    tg.start_soon(replica.fetchval, "SELECT token_reset_fold_deductions()")
    finally:
        for replica in replicas:
            await replica.close()
    assert await conn.fetchval(
        "SELECT sum(deductions) FROM token_reset_deduction_totals"
    ) == await conn.fetchval("SELECT count(*) FROM token_transactions WHERE operation = 'deduct'")
    assert await conn.fetchval("SELECT sum(deductions) FROM token_reset_deduction_totals") == 200


async def test_the_recount_waits_for_an_open_ledger_writer_and_counts_it(
    conn: asyncpg.Connection, app: asyncpg.Connection, database_url: str
) -> None:
    """`migrate` builds the totals with this recount: a deduction whose transaction is
    still open when it starts is counted once it commits, and no writer is blocked."""
    user, other = uuid.uuid4(), uuid.uuid4()
    for each in (user, other):
        await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", each)
    async with login_role(conn, database_url, "token_reset_app") as url:
        holder = await asyncpg.connect(url)
        owner = await asyncpg.connect(database_url)
        try:
            txn = holder.transaction()
            await txn.start()
            await holder.fetchval("SELECT deduct_tokens($1, 6, 'open')", user)
            recounted: list[int] = []

            async def recount() -> None:
                recounted.append(await owner.fetchval("SELECT token_reset_recount_deductions()"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(recount)

                async def waiting() -> bool:
                    return bool(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                            " AND query LIKE '%token_reset_recount_deductions%'"
                            " AND pid <> pg_backend_pid()"
                        )
                    )

                await wait_until(waiting, what="the recount waiting for the writer")
                # Not blocked: another deduction goes through meanwhile.
                await app.fetchval("SELECT deduct_tokens($1, 2, 'meanwhile')", other)
                await txn.commit()
        finally:
            await holder.close()
            await owner.close()
    assert recounted
    totals = dict(await conn.fetch("SELECT feature, tokens FROM token_reset_deduction_totals"))
    assert totals["open"] == 6


async def test_the_recount_gives_up_on_a_writer_that_stays_open_and_names_it(
    conn: asyncpg.Connection, app: asyncpg.Connection, database_url: str
) -> None:
    user = uuid.uuid4()
    await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    await app.fetchval("SELECT deduct_tokens($1, 3, 'done')", user)
    await conn.fetchval("SELECT token_reset_recount_deductions()")
    before = await conn.fetch("SELECT * FROM token_reset_deduction_totals ORDER BY 1, 2")
    async with login_role(conn, database_url, "token_reset_app") as url:
        holder = await asyncpg.connect(url)
        try:
            async with holder.transaction():
                await holder.fetchval("SELECT deduct_tokens($1, 6, 'open')", user)
                with pytest.raises(asyncpg.LockNotAvailableError, match="stayed open"):
                    await conn.fetchval(
                        "SELECT token_reset_recount_deductions(p_wait_seconds => 0.2)"
                    )
        finally:
            await holder.close()
    # Nothing lost: the failed recount changed nothing.
    assert await conn.fetch("SELECT * FROM token_reset_deduction_totals ORDER BY 1, 2") == before


async def test_upgrading_a_busy_database_starts_the_analytics_from_its_data(
    empty_database_url: str,
) -> None:
    """0010 and 0011 on a database with users and deductions already: the totals and the
    near/at counts start equal to SQL over the data, not at zero."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await apply_migrations(conn, target=9)
        for used in (9, 10, 3):  # of a limit of 10: 80 % and 100 % are 2 and 1 users
            user = await add_user(conn, limit=10)
            await conn.fetchval("SELECT deduct_tokens($1, $2, 'chat')", user, used)
        await add_user(conn, used=9, limit=10, stale=True)  # last period's: near no limit now
        await apply_migrations(conn)
        assert await conn.fetch(COUNTER_DRIFT) == []
        assert dict(
            await conn.fetch("SELECT feature, tokens FROM token_reset_deduction_totals")
        ) == {"chat": 22}
        current = await conn.fetchrow(
            "SELECT near_limit_users, at_limit_users FROM token_reset_usage"
            " WHERE period = token_reset_period_label(now())"
        )
        assert tuple(current) == (2, 1)
    finally:
        await conn.close()


async def test_a_deduction_the_totals_cannot_hold_never_stops_the_watchdog(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """Found by a hostile review: the application could write a feature name too long
    for the totals' index (or the owner a ledger row with a malformed period label),
    and every later fold, and with it every watchdog check, failed: the missed-reset
    alert went deaf.  The fold now stores such rows under a bounded name and the row's
    own partition, and a fold that fails anyway never stops the check."""
    await add_stale_users(conn, 3, used=5)
    user = uuid.uuid4()
    await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    long_feature = "f" * 5000
    await app.fetchval("SELECT deduct_tokens($1, 4, $2)", user, long_feature)
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata)"
        " VALUES ($1, 'deduct', 'odd', 2, '{\"period\": \"2026-11-01\"}')",
        user,
    )
    watchdog = Watchdog(settings_for(listener_url), Metrics.fresh())
    try:
        assessment = await watchdog.check_once()
    finally:
        watchdog.close()
    assert assessment is not None, "the check must still read the facts"
    assert sample(watchdog.metrics, "token_reset_stale_users") == 3
    exported = exported_tokens(watchdog.metrics)
    assert exported[long_feature[:200]] == 4
    assert exported["odd"] == 2


async def test_a_fold_that_fails_leaves_the_check_working(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """Whatever makes the fold fail (here: the ledger's ids went back behind the cursor,
    as after a restore), the missed-reset check still runs and says what is wrong."""
    await add_stale_users(conn, 2, used=5)
    await conn.execute("UPDATE token_reset_deduction_cursor SET last_id = 1000000")
    watchdog = Watchdog(settings_for(listener_url), Metrics.fresh())
    try:
        assert await watchdog.check_once() is not None
    finally:
        watchdog.close()
    assert sample(watchdog.metrics, "token_reset_stale_users") == 2
    listener = await asyncpg.connect(listener_url)
    try:
        with pytest.raises(asyncpg.PostgresError, match="recount"):
            await listener.fetchval("SELECT token_reset_fold_deductions()")
    finally:
        await listener.close()


async def test_the_watchdog_folds_under_a_serializable_default(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """README supports default_transaction_isolation = serializable; the fold needs READ
    COMMITTED, so the watchdog asks for it instead of failing every check."""
    role = listener_url.split("://")[1].split("@", maxsplit=1)[0]
    await conn.execute(f'ALTER ROLE "{role}" SET default_transaction_isolation = serializable')
    user = uuid.uuid4()
    await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    await app.fetchval("SELECT deduct_tokens($1, 4, 'chat')", user)
    assert exported_tokens(await check(listener_url)) == {"chat": 4, "other": 0}


def test_the_refused_counter_is_absent_until_the_database_was_read() -> None:
    """A counter that read 0 after each restart would make increase() report every refusal
    since the install again (found by a hostile review)."""
    metrics = Metrics.fresh()
    assert sample(metrics, "token_reset_deductions_refused_total") is None
    metrics.deductions_refused.set(7)
    assert sample(metrics, "token_reset_deductions_refused_total") == 7


async def test_at_the_boundary_a_deduction_counts_in_the_period_its_row_names(
    conn: asyncpg.Connection, app: asyncpg.Connection, listener_url: str
) -> None:
    """A transaction begun before midnight that writes after the new month's reset files
    its row in the old period's partition, labelled with the new period: it counts now.
    Last period's deductions alone leave this period at zero ("other" 0)."""
    user = uuid.uuid4()
    await app.execute("INSERT INTO user_tokens (user_id) VALUES ($1)", user)
    last = f"token_reset_period_label({LAST_MONTH_28TH})"
    await conn.execute(
        "INSERT INTO token_transactions (user_id, operation, feature, amount, metadata, period)"
        f" VALUES ($1, 'deduct', 'late', 5, jsonb_build_object('period', {last}), {last}),"
        f" ($1, 'deduct', 'early', 3,"
        f"  jsonb_build_object('period', token_reset_period_label(now())), {last})",
        user,
    )
    assert exported_tokens(await check(listener_url)) == {"early": 3, "other": 0}
