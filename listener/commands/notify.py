"""`token-reset notify --test`: a sample rollover notice to every NOTICE_URLS destination."""

from __future__ import annotations

import argparse
import sys

from listener.config import Settings
from listener.destinations import load_destinations
from listener.notices import deliver, sample_message


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`token-reset notify --test`: one line per destination, 0 when all were delivered."""
    destinations = load_destinations(settings.notice_urls)
    if not destinations:
        print("token-reset: error: NOTICE_URLS is not set: no destination to test", file=sys.stderr)
        return 2
    message = sample_message()
    failures = 0
    for destination in destinations:
        result = await deliver(destination, message)
        if result.ok:
            print(f"{destination.label}: ok")
        else:
            failures += 1
            print(f"{destination.label}: FAILED: {result.reason}")
    return 0 if failures == 0 else 1
