"""`token-reset notify --test`: a sample rollover notice to every NOTICE_URLS destination."""

from __future__ import annotations

import argparse
import functools
import sys

import anyio

from listener.config import Settings
from listener.destinations import load_destinations, send
from listener.notices import sample_message


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`token-reset notify --test`: one line per destination, 0 when all were delivered."""
    destinations = load_destinations(settings.notice_urls)
    if not destinations:
        print("token-reset: error: NOTICE_URLS is not set: no destination to test", file=sys.stderr)
        return 2
    message = sample_message()
    failures = 0
    for destination in destinations:
        result = await anyio.to_thread.run_sync(
            functools.partial(
                send,
                destination,
                title=message.title,
                body=message.body,
                notice_type=message.notice_type,
            ),
            abandon_on_cancel=True,
        )
        if result.ok:
            print(f"{destination.label}: ok")
        else:
            failures += 1
            print(f"{destination.label}: FAILED: {result.reason}")
    return 0 if failures == 0 else 1
