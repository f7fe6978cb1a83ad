"""Shared by the rollover-notice tests: destinations with secrets, a real rollover, checks.

The destinations point at a local RecordingServer: `json://` (apprise's plain JSON
POST: {"title", "message", "type", ...}) and `mmost://` (a Mattermost incoming
webhook, whose body is the Slack-compatible {"text": ...}; apprise's `slack://` only
posts to hooks.slack.com, so Mattermost is the Slack-format one we can point at
loopback).  Each URL carries secrets made of letters outside a-f, so no 8-character
piece of them can appear in a hex hash by chance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from listener.bulk import BulkResult, run_bulk_reset
from listener.config import Settings
from tests.support.recording_server import Received
from tests.support.users import LAST_MONTH_28TH

JSON_PASSWORD = "PwXyzzyQwopRstuvGhijk"
JSON_PATH_TOKEN = "PathTokQrstUvwxYzMnop"
MATTERMOST_TOKEN = "MmTokZyxwvUtsrQpOnmlK"
SECRETS = (JSON_PASSWORD, JSON_PATH_TOKEN, MATTERMOST_TOKEN)
JSON_PATH = f"/notify/{JSON_PATH_TOKEN}"
MATTERMOST_PATH = f"/hooks/{MATTERMOST_TOKEN}"


def notice_urls(receiver_url: str) -> tuple[str, str]:
    """(plain JSON, Slack-compatible) destination URLs on the receiver."""
    host = receiver_url.removeprefix("http://")
    return (
        f"json://hook:{JSON_PASSWORD}@{host}{JSON_PATH}",
        f"mmost://{host}/{MATTERMOST_TOKEN}",
    )


def secret_pieces() -> set[str]:
    """Every 8-character piece of every secret (and the secrets themselves)."""
    pieces = set(SECRETS)
    for secret in SECRETS:
        pieces |= {secret[i : i + 8] for i in range(len(secret) - 7)}
    return pieces


def leaked(text: str) -> set[str]:
    """The secret pieces found in `text` (must be empty)."""
    return {piece for piece in secret_pieces() if piece in text}


@dataclass(frozen=True)
class Rollover:
    """What a rollover did, read back from the database to check a notice against."""

    period: str
    by_source: dict[str, int]
    bulk: BulkResult
    completed_after_seconds: float


async def start_rollover(conn: asyncpg.Connection) -> None:
    """A real month rollover, first half: 30 users with usage move into last period (an
    UPDATE of their reset time), then 3 are reset by a write (trigger) and 2 by
    deduct_tokens (function); 25 still carry last period's usage."""
    await conn.execute(
        "INSERT INTO user_tokens (user_id, monthly_tokens_used)"
        " SELECT gen_random_uuid(), 40 FROM generate_series(1, 30)"
    )
    await conn.execute(f"UPDATE user_tokens SET last_monthly_reset = {LAST_MONTH_28TH}")
    users = [r[0] for r in await conn.fetch("SELECT user_id FROM user_tokens ORDER BY user_id")]
    await conn.execute(
        "UPDATE user_tokens SET monthly_tokens_used = monthly_tokens_used + 1"
        " WHERE user_id = ANY($1::uuid[])",
        users[:3],
    )
    for user in users[3:5]:
        await conn.execute("SELECT deduct_tokens($1, 1, 'chat')", user)


def assert_complete_notice(text: str, done: Rollover) -> None:
    """A completion notice's text tells start_rollover's rollover as it happened: the
    period, the resets by path, the bulk run and its batches, nobody left stale."""
    assert f"Token rollover {done.period} complete" in text, text
    assert "Users reset: 30 (bulk 25, trigger 3, function 2)." in text, text
    assert f"Bulk runs this period: 1 (1 success), {done.bulk.batches} batches." in text, text
    assert "Left stale: 0 users carry last period's usage." in text, text


async def finish_rollover(conn: asyncpg.Connection, settings: Settings) -> Rollover:
    """Second half: the bulk run (listener.bulk, batches of 10) resets the other 25."""
    bulk = await run_bulk_reset(settings, source="cli", batch_size=10)
    return await read_back(conn, bulk)


async def rollover(conn: asyncpg.Connection, settings: Settings) -> Rollover:
    """Both halves at once."""
    await start_rollover(conn)
    return await finish_rollover(conn, settings)


async def read_back(conn: asyncpg.Connection, bulk: BulkResult) -> Rollover:
    """The period's reset rows by source and when the last one was written."""
    rows = await conn.fetch(
        "SELECT metadata ->> 'source' AS source, count(*) AS n FROM token_transactions"
        " WHERE operation = 'reset'"
        " AND metadata ->> 'period' = token_reset_period_label(now()) GROUP BY 1"
    )
    after = await conn.fetchval(
        "SELECT extract(epoch FROM max(created_at) - token_reset_period_start())::float8"
        " FROM token_transactions WHERE operation = 'reset'"
    )
    period = await conn.fetchval("SELECT token_reset_period_label(now())")
    return Rollover(period, {r["source"]: r["n"] for r in rows}, bulk, after)


def mattermost_fails_first(times: int) -> Callable[[str], int | None]:
    """A RecordingServer.status_for: the Slack-compatible destination answers 500 to its
    first `times` requests (a transient outage), then as usual; the others as usual."""
    failures_left = [times]

    def status_for(path: str) -> int | None:
        if path == MATTERMOST_PATH and failures_left[0] > 0:
            failures_left[0] -= 1
            return 500
        return None

    return status_for


def accepted(received: list[Received], path: str) -> list[Any]:
    """Bodies a destination accepted (answered 2xx) on this path."""
    return [r.body for r in received if r.path == path and 200 <= r.status < 300]


def text_of(body: Any) -> str:
    """The message text of either format: JSON's title + message, Mattermost's text."""
    if "text" in body:
        return str(body["text"])
    return f"{body['title']}\n{body['message']}"
