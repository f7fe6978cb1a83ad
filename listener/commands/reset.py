"""`token-reset reset`: the bulk backup reset from the command line, for any scheduler.

stdout carries only the JSON result (a cron wrapper can parse it); logs go to stderr,
and on a terminal a progress line per batch.  Exit 0 on success (also when another
run was already going: the answer then says "skipped"), 1 on failure, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from listener.bulk import BatchProgress, BulkResetError, run_bulk_reset
from listener.config import Settings
from listener.logs import configure_logging


def _print_progress(progress: BatchProgress) -> None:
    """One line per committed batch, for an operator watching a large user base."""
    print(
        f"token-reset: batch {progress.batches} committed, "
        f"{progress.reset_count} users reset so far ({progress.elapsed_ms / 1000:.1f} s)",
        file=sys.stderr,
        flush=True,
    )


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """Run one bulk reset and print its JSON result."""
    # The CLI set logging up on stdout; here stdout is reserved for the result.
    configure_logging(settings.log_format, settings.log_level, stream=sys.stderr)
    # --batch-size is already in the settings, validated like BULK_BATCH_SIZE.
    batch_size = settings.bulk_batch_size
    on_batch = _print_progress if sys.stderr.isatty() else None
    try:
        result = await run_bulk_reset(
            settings, source="cli", batch_size=batch_size, on_batch=on_batch
        )
    except BulkResetError as exc:
        print(f"token-reset: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json()), flush=True)
    return 0
