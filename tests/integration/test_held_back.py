"""One idle application transaction that wrote the ledger holds all reset counting back.

Ledger ids become visible at commit, so the listener only counts past ids whose
writers have finished (the settled horizon).  `BEGIN; SELECT deduct_tokens(...)` and
then nothing freezes counting for everyone until that transaction ends.  It must be
visible while it happens: a gauge of how long, and a log line naming the session.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import anyio
import asyncpg
import pytest
from structlog.testing import capture_logs

from listener.metrics import Metrics
from listener.service import Service
from tests.support.database import open_transaction
from tests.support.env import listener_settings
from tests.support.metrics import counted
from tests.support.service import ready, wait_counts_match_ledger
from tests.support.users import add_stale_users, reset_by_trigger
from tests.support.waiting import wait_until

pytestmark = pytest.mark.anyio

HOLDER_APPLICATION = "held-back-test-app"
HELD_BACK = "token_reset_ledger_held_back_seconds"


def idle_writer(database_url: str, user: object) -> AbstractAsyncContextManager[asyncpg.Connection]:
    """BEGIN; deduct_tokens(...) on a connection of its own, then idle until the block ends."""
    return open_transaction(
        database_url,
        "SELECT deduct_tokens($1, 1, 'chat')",
        user,
        application_name=HOLDER_APPLICATION,
        commit=True,
    )


async def test_an_idle_transaction_holding_counting_back_is_measured_and_named(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The gauge grows while the writer idles, the log names its pid; all counted after."""
    users = await add_stale_users(conn, 4)
    service = Service(listener_settings(database_url), Metrics.fresh(), handle_signals=False)
    # How long a hold may last before the log names it (30 s in production).
    service.ledger.warn_after_seconds = 1.0
    registry = service.metrics.registry
    with capture_logs() as logs:
        async with anyio.create_task_group() as group:
            await group.start(service.run)
            try:
                await ready(service)
                assert registry.get_sample_value(HELD_BACK) == 0
                async with idle_writer(database_url, users[0]) as holder:
                    holder_pid = holder.get_server_pid()
                    # Resets after the idle writer's ledger row: settled only once it ends.
                    await reset_by_trigger(conn, users[1:])
                    await wait_until(
                        lambda: (registry.get_sample_value(HELD_BACK) or 0) > 2.0,
                        what="the held-back gauge to pass 2 s",
                    )
                    await wait_until(
                        lambda: any(e["event"] == "ledger_horizon_waiting" for e in logs),
                        what="the log line naming the holder",
                    )
                    held = counted(service.metrics)
                truth = await wait_counts_match_ledger(service, conn)
                await wait_until(
                    lambda: registry.get_sample_value(HELD_BACK) == 0,
                    what="the gauge back at 0",
                )
            finally:
                service.stop()
    assert held == {"trigger": 0, "function": 0, "bulk": 0}
    assert truth == {"trigger": 3, "function": 1, "bulk": 0}
    (warning,) = [e for e in logs if e["event"] == "ledger_horizon_waiting"]
    assert warning["log_level"] == "warning"
    (holder_info,) = warning["holders"]
    assert holder_info["pid"] == holder_pid
    assert holder_info["application_name"] == HOLDER_APPLICATION
    assert holder_info["state"] == "idle in transaction"
    assert holder_info["transaction_seconds"] >= 1.0
