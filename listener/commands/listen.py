"""`token-reset listen`: the service (listener.service) until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse

from listener.config import Settings
from listener.service import Service


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """`token-reset listen`: serve until SIGTERM/SIGINT; 0 on an orderly stop."""
    return await Service(settings).run()
