"""Logs are one JSON object per line, the same for structlog events and stdlib records."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from listener.config import LogFormat
from listener.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """A StringIO the logging configuration writes to; global state restored after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    saved = structlog.get_config()
    buffer = io.StringIO()
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()
        structlog.configure(**saved)


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    """Every line written, parsed as JSON (fails if any line is not a JSON object)."""
    parsed = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


def assert_utc_iso_timestamp(value: object) -> None:
    """ISO-8601, timezone UTC, and close to now."""
    assert isinstance(value, str)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - moment) < timedelta(minutes=1)


def test_structlog_events_are_json_lines(stream: io.StringIO) -> None:
    """An event becomes one line with timestamp, level, event and its fields."""
    configure_logging("json", "INFO", stream=stream)
    structlog.get_logger("listener.test").info("resets_recorded", count=3, source="bulk")
    (entry,) = lines(stream)
    assert entry["event"] == "resets_recorded"
    assert entry["level"] == "info"
    assert (entry["count"], entry["source"]) == (3, "bulk")
    assert_utc_iso_timestamp(entry["timestamp"])


def test_stdlib_records_are_rendered_the_same_way(stream: io.StringIO) -> None:
    """asyncpg's and hypercorn's own records go through the same JSON renderer."""
    configure_logging("json", "INFO", stream=stream)
    logging.getLogger("hypercorn.error").warning("Running on %s", "http://127.0.0.1:1")
    (entry,) = lines(stream)
    assert entry["event"] == "Running on http://127.0.0.1:1"
    assert entry["level"] == "warning"
    assert entry["logger"] == "hypercorn.error"
    assert_utc_iso_timestamp(entry["timestamp"])


def explode() -> None:
    """Raise, so a test has a real traceback to log."""
    raise ValueError("boom")


def test_exceptions_stay_on_one_line(stream: io.StringIO) -> None:
    """A traceback is structured data inside the line, not extra lines that break parsers."""
    configure_logging("json", "INFO", stream=stream)
    try:
        explode()
    except ValueError:
        structlog.get_logger("listener.test").exception("listener_task_failed")
    (entry,) = lines(stream)
    assert entry["event"] == "listener_task_failed"
    assert "boom" in json.dumps(entry["exception"])


def test_the_level_filters_both_kinds(stream: io.StringIO) -> None:
    """LOG_LEVEL=WARNING drops info from structlog and from the standard library."""
    configure_logging("json", "WARNING", stream=stream)
    structlog.get_logger("listener.test").info("probe_echoed")
    logging.getLogger("asyncpg").info("chatter")
    structlog.get_logger("listener.test").warning("listener_disconnected", reason="test")
    assert [entry["event"] for entry in lines(stream)] == ["listener_disconnected"]


def test_console_format_is_for_humans(stream: io.StringIO) -> None:
    """LOG_FORMAT=console renders readable text with the event and its fields."""
    configure_logging("console", "INFO", stream=stream)
    structlog.get_logger("listener.test").info("listener_connected", backend_pid=42)
    text = stream.getvalue()
    assert "listener_connected" in text
    assert "backend_pid=42" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


# Distinctive enough that no other text in a log line contains it by chance.
LOCAL_SECRET = "pQzWxVmKrTnLsJhGfDyBcXaEuIoPlKjHgFdSaQwErTyUiOpZxCvBnMqWeRtYuIoP"


def explode_holding_a_secret() -> None:
    """Raise with a secret in a local variable, as connect(dsn=...) frames hold DSNs."""
    dsn = f"postgresql://app:{LOCAL_SECRET}@db/app"
    raise ConnectionError(f"cannot reach {len(dsn)}-character address")


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_tracebacks_never_show_frame_locals(stream: io.StringIO, log_format: LogFormat) -> None:
    """A logged traceback names files, lines and the error, never a frame's variables.

    structlog's defaults show locals (dict_tracebacks; rich's console tracebacks when
    rich is installed), and locals are where DSNs, settings and secrets live.
    """
    configure_logging(log_format, "INFO", stream=stream)
    try:
        explode_holding_a_secret()
    except ConnectionError:
        structlog.get_logger("listener.test").exception("listener_task_failed")
    try:
        explode_holding_a_secret()
    except ConnectionError:
        logging.getLogger("asyncpg").exception("stdlib record with a traceback")
    text = stream.getvalue()
    assert "explode_holding_a_secret" in text  # the traceback is there
    assert "cannot reach" in text
    assert LOCAL_SECRET[:8] not in text
