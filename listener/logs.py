"""structlog set-up: one JSON object per line on stdout, or console rendering.

The standard library's records (asyncpg, hypercorn) go through the same processors,
so an SRE's log pipeline sees one format.  Configured once, at process start.

Tracebacks never carry frame locals, in either format: structlog's defaults show them
(``dict_tracebacks``, and rich's console tracebacks when rich is installed), and the
locals of a failed connect or bulk run are the settings, the DSN and the cron secret.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from structlog.typing import Processor

from listener.config import LogFormat

# File, line, function and the error itself; no variables.
_JSON_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)

_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_logging(
    log_format: LogFormat = "json", level: str = "INFO", stream: TextIO | None = None
) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) in one format."""
    renderer: Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        tail: list[Processor] = [_JSON_TRACEBACKS]
    else:
        # plain_traceback explicitly: the default is rich's or better-exceptions'
        # formatter when either is installed, and both print every frame's locals.
        renderer = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
        tail = []
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
