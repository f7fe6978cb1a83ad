"""Doorbell payload parsing (untrusted input) and the bounded doorbell buffer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listener.connection import DoorbellBuffer
from listener.metrics import Metrics
from listener.payload import (
    MAX_ID,
    MAX_PAYLOAD_BYTES,
    Doorbell,
    Malformed,
    Probe,
    new_nonce,
    parse_payload,
    probe_payload,
)
from tests.support.metrics import notifications

ids = st.integers(min_value=1, max_value=MAX_ID)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


def test_the_triggers_payload_is_a_doorbell() -> None:
    """The exact text the statement trigger sends parses into a typed, frozen object."""
    parsed = parse_payload('{"v" : 1, "first_id" : 5, "last_id" : 9, "count" : 5}')
    assert parsed == Doorbell(v=1, first_id=5, last_id=9, count=5)
    with pytest.raises(AttributeError):
        parsed.count = 6  # type: ignore[misc]


def test_richer_payloads_are_accepted() -> None:
    """Extra keys (the row trigger's "coalesced") are forward-compatible, not malformed."""
    parsed = parse_payload('{"v":1,"first_id":7,"last_id":7,"count":1,"coalesced":true}')
    assert parsed == Doorbell(v=1, first_id=7, last_id=7, count=1)


def test_bytes_are_parsed_like_text() -> None:
    """asyncpg hands over str, but bytes input must follow the same rules."""
    assert parse_payload(b'{"v":1,"first_id":1,"last_id":1,"count":1}') == Doorbell(1, 1, 1, 1)
    assert parse_payload(b"\xff\xfe") == Malformed("payload is not UTF-8", 2)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("garbage", "payload is not JSON"),
        ("", "payload is not JSON"),
        ("[1, 2]", "payload is not a JSON object"),
        ('{"first_id": 1, "last_id": 1, "count": 1}', "unknown payload version None"),
        ('{"v": 2, "first_id": 1, "last_id": 1, "count": 1}', "unknown payload version 2"),
        ('{"v": true, "first_id": 1, "last_id": 1, "count": 1}', "unknown payload version True"),
        ('{"v": "1", "first_id": 1, "last_id": 1, "count": 1}', "unknown payload version '1'"),
        ('{"v": 1, "first_id": "1", "last_id": 1, "count": 1}', "first_id must be an integer"),
        ('{"v": 1, "first_id": 1.0, "last_id": 1, "count": 1}', "first_id must be an integer"),
        ('{"v": 1, "first_id": 1, "count": 1}', "last_id must be an integer, got None"),
        ('{"v": 1, "first_id": -3, "last_id": 1, "count": 1}', "first_id must be between"),
        ('{"v": 1, "first_id": 0, "last_id": 1, "count": 1}', "first_id must be between"),
        ('{"v": 1, "first_id": 1, "last_id": 1, "count": 0}', "count must be between"),
        ('{"v": 1, "first_id": 9, "last_id": 3, "count": 1}', "id range is inverted"),
        ('{"v": 1, "first_id": 1, "last_id": 3, "count": 4}', "count 4 does not fit"),
        (f'{{"v": 1, "first_id": {MAX_ID + 1}, "last_id": 1, "count": 1}}', "must be between"),
        ('{"probe": 42}', "probe nonce must be a string"),
        ('{"probe": ""}', "probe nonce must be a string"),
    ],
)
def test_malformed_payloads_say_why(payload: str, reason: str) -> None:
    """Each kind of bad payload becomes Malformed with a reason naming the problem."""
    parsed = parse_payload(payload)
    assert isinstance(parsed, Malformed)
    assert reason in parsed.reason


def test_oversized_payloads_are_refused_before_parsing() -> None:
    """A payload over the cap is malformed whatever it contains."""
    padding = " " * MAX_PAYLOAD_BYTES
    parsed = parse_payload('{"v":1,"first_id":1,"last_id":1,"count":1}' + padding)
    assert isinstance(parsed, Malformed)
    assert "exceeds" in parsed.reason
    # Multi-byte characters count in bytes, as PostgreSQL counts them.
    assert isinstance(parse_payload("é" * (MAX_PAYLOAD_BYTES // 2 + 1)), Malformed)


def test_deep_nesting_does_not_escape_as_recursion_error() -> None:
    """Nesting within the size cap is parsed (or refused) without raising."""
    assert isinstance(parse_payload("[" * 500 + "]" * 500), Malformed)


def test_probe_round_trips_its_nonce() -> None:
    """The probe we send parses back into the same nonce; nonces do not repeat."""
    nonce = new_nonce()
    assert parse_payload(probe_payload(nonce)) == Probe(nonce)
    assert new_nonce() != nonce
    assert len(probe_payload(nonce).encode()) < MAX_PAYLOAD_BYTES


@given(st.text())
def test_arbitrary_text_never_raises(payload: str) -> None:
    """Any text at all yields one of the three typed results."""
    assert isinstance(parse_payload(payload), Doorbell | Probe | Malformed)


@given(st.binary())
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    """Any bytes at all yield one of the three typed results."""
    assert isinstance(parse_payload(payload), Doorbell | Probe | Malformed)


@given(json_values)
def test_arbitrary_json_never_raises(value: object) -> None:
    """Any JSON document, including objects with the right keys and wrong types."""
    assert isinstance(parse_payload(json.dumps(value)), Doorbell | Probe | Malformed)


@given(
    st.fixed_dictionaries(
        {"v": json_values, "first_id": json_values, "last_id": json_values, "count": json_values}
    )
)
def test_doorbell_shaped_json_never_raises(value: dict[str, object]) -> None:
    """Objects with every doorbell key but arbitrary values are judged, never crash."""
    parsed = parse_payload(json.dumps(value))
    if isinstance(parsed, Doorbell):
        assert 1 <= parsed.first_id <= parsed.last_id
        assert 1 <= parsed.count <= parsed.last_id - parsed.first_id + 1


@given(ids, st.integers(min_value=0, max_value=10**6), st.data())
def test_valid_ranges_round_trip(first_id: int, span: int, data: st.DataObject) -> None:
    """Every consistent id range comes back exactly as sent."""
    last_id = min(first_id + span, MAX_ID)
    count = data.draw(st.integers(min_value=1, max_value=last_id - first_id + 1))
    text = json.dumps({"v": 1, "first_id": first_id, "last_id": last_id, "count": count})
    assert parse_payload(text) == Doorbell(v=1, first_id=first_id, last_id=last_id, count=count)


@given(ids, ids)
def test_inverted_ranges_are_malformed(a: int, b: int) -> None:
    """last_id below first_id is refused whatever the numbers."""
    first_id, last_id = max(a, b), min(a, b)
    if first_id == last_id:
        return
    text = json.dumps({"v": 1, "first_id": first_id, "last_id": last_id, "count": 1})
    assert isinstance(parse_payload(text), Malformed)


def overflow_count(metrics: Metrics) -> float:
    """token_reset_notifications_total{outcome="overflow"}."""
    return float(notifications(metrics, "overflow"))


@pytest.mark.anyio
async def test_a_full_buffer_drops_counts_and_asks_for_one_catch_up() -> None:
    """Overflow never blocks the callback: it drops, counts, and requests a catch-up read;
    once the stream is drained it accepts doorbells again."""
    metrics = Metrics.fresh()
    buffer = DoorbellBuffer(metrics, size=3)
    for n in range(5):
        buffer.offer(f"doorbell {n}")
    assert buffer.dropped == 2
    # The counter is brought up to date once per processing round, not per drop.
    assert buffer.take_catch_up_request() is True
    assert overflow_count(metrics) == 2.0
    assert buffer.take_catch_up_request() is False
    assert overflow_count(metrics) == 2.0
    # One collect drains everything waiting: the coalescing step.
    assert await buffer.collect(within=1.0) == ["doorbell 0", "doorbell 1", "doorbell 2"]
    assert await buffer.collect(within=0.0) == []
    buffer.offer("after the burst")
    assert await buffer.collect(within=1.0) == ["after the burst"]
    buffer.close()
