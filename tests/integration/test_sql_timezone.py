"""The period is the calendar month in the configured zone, never the session's TimeZone."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg
import pytest

pytestmark = pytest.mark.anyio

SESSION_ZONES = ("Pacific/Kiritimati", "America/Los_Angeles", "UTC")


async def session_in(url: str, zone: str) -> asyncpg.Connection:
    """A connection whose session TimeZone is `zone` (UTC+14 and UTC-8/-7 disagree on dates)."""
    conn: asyncpg.Connection = await asyncpg.connect(url, server_settings={"TimeZone": zone})
    return conn


async def test_sessions_in_any_zone_agree_on_the_period(database_url: str) -> None:
    """Kiritimati, Los Angeles and UTC sessions see the same period start and label."""
    answers = set()
    for zone in SESSION_ZONES:
        conn = await session_in(database_url, zone)
        try:
            answers.add(
                tuple(
                    await conn.fetchrow(
                        "SELECT token_reset_period_start(), token_reset_period_label(now()),"
                        " token_reset_next_period_start()"
                    )
                )
            )
        finally:
            await conn.close()
    assert len(answers) == 1
    start, _label, _next = answers.pop()
    assert start.astimezone(dt.UTC).day == 1
    assert start.astimezone(dt.UTC).time() == dt.time(0, 0)


async def test_rows_either_side_of_the_utc_boundary(database_url: str) -> None:
    """A second before 00:00 UTC on the 1st is stale and a second after is not, in every zone."""
    setup = await asyncpg.connect(database_url)
    before, after = uuid.uuid4(), uuid.uuid4()
    try:
        await setup.execute(
            "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset) VALUES"
            " ($1, 7, token_reset_period_start() - interval '1 second'),"
            " ($2, 7, token_reset_period_start() + interval '1 second')",
            before,
            after,
        )
    finally:
        await setup.close()
    for zone in SESSION_ZONES:
        conn = await session_in(database_url, zone)
        try:
            seen = dict(
                await conn.fetch(
                    "SELECT user_id, monthly_tokens_used FROM user_tokens_with_auto_reset"
                )
            )
        finally:
            await conn.close()
        assert seen == {before: 0, after: 7}, zone


async def test_configured_zone_moves_the_boundary(database_url: str) -> None:
    """With the zone set to Pacific/Kiritimati (UTC+14) the month starts at 10:00 UTC the day
    before, and sessions in other zones still agree."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT token_reset_configure('Pacific/Kiritimati')")
        utc_start = await conn.fetchval(
            "SELECT timezone('UTC', date_trunc('month', timezone('UTC', now())))"
        )
    finally:
        await conn.close()
    starts = set()
    for zone in SESSION_ZONES:
        session = await session_in(database_url, zone)
        try:
            starts.add(await session.fetchval("SELECT token_reset_period_start()"))
            label = await session.fetchval("SELECT token_reset_period_label(now())")
            kiritimati_now = await session.fetchval(
                "SELECT to_char(now() AT TIME ZONE 'Pacific/Kiritimati', 'YYYY-MM')"
            )
            assert label == kiritimati_now
        finally:
            await session.close()
    assert len(starts) == 1
    start = starts.pop()
    local = start.astimezone(dt.timezone(dt.timedelta(hours=14)))
    assert (local.day, local.hour, local.minute) == (1, 0, 0)
    # The Kiritimati month starts 14 hours before the UTC month of the same name, or
    # (late in a UTC month) the next one already began there.
    assert (utc_start - start) == dt.timedelta(hours=14) or start > utc_start


async def test_session_timezone_cannot_be_used_to_dodge(database_url: str) -> None:
    """A session in UTC-8 writing near the boundary still resets a row stale in UTC."""
    conn = await session_in(database_url, "America/Los_Angeles")
    user = uuid.uuid4()
    try:
        await conn.execute(
            "INSERT INTO user_tokens (user_id, monthly_tokens_used, last_monthly_reset)"
            " VALUES ($1, 50, token_reset_period_start() - interval '1 minute')",
            user,
        )
        await conn.execute(
            "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
            " WHERE user_id = $1",
            user,
        )
        assert (
            await conn.fetchval(
                "SELECT monthly_tokens_used FROM user_tokens WHERE user_id = $1", user
            )
            == 1
        )
    finally:
        await conn.close()
