"""Doorbell payloads on the token_resets channel, parsed into typed, frozen objects.

Any database role can NOTIFY any channel, so a payload is untrusted input: parsing
never raises.  Whatever is not a well-formed doorbell or probe becomes a `Malformed`
with a reason, which the service logs and counts.  Even a well-formed doorbell only
says "look": the listener reads the ledger and never uses the payload's numbers.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Final, Literal

CHANNEL: Final = "token_resets"
# PostgreSQL allows 8000 bytes; ours are under 100.  Anything big is not ours, and
# the cap bounds the work a hostile payload can cause before it is refused.
MAX_PAYLOAD_BYTES: Final = 1024
# Ledger ids are bigint.
MAX_ID: Final = 2**63 - 1
_PROBE_KEY: Final = "probe"


@dataclass(frozen=True)
class Doorbell:
    """A version-1 announcement that ledger ids first_id..last_id were written."""

    v: Literal[1]
    first_id: int
    last_id: int
    count: int


@dataclass(frozen=True)
class Probe:
    """A liveness probe: some listener NOTIFYed the channel with a random nonce."""

    nonce: str


@dataclass(frozen=True)
class Malformed:
    """A payload that is neither a doorbell nor a probe, and why."""

    reason: str
    size: int


Payload = Doorbell | Probe | Malformed


def parse_payload(raw: str | bytes) -> Payload:
    """Parse one NOTIFY payload; never raises, whatever the input."""
    decoded = _decode(raw)
    if isinstance(decoded, Malformed):
        return decoded
    text, size = decoded
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return Malformed("payload is not JSON", size)
    if not isinstance(data, dict):
        return Malformed("payload is not a JSON object", size)
    if _PROBE_KEY in data:
        return _probe(data, size)
    return _doorbell(data, size)


def probe_payload(nonce: str) -> str:
    """The text a listener NOTIFYs itself with to prove the connection round-trips."""
    return json.dumps({_PROBE_KEY: nonce}, separators=(",", ":"))


def new_nonce() -> str:
    """An unguessable nonce, so nobody else's NOTIFY can answer our probe."""
    return secrets.token_hex(16)


def _decode(raw: str | bytes) -> tuple[str, int] | Malformed:
    """The payload as text and its size in bytes, or why it is refused before parsing."""
    if isinstance(raw, bytes):
        size = len(raw)
        if size > MAX_PAYLOAD_BYTES:
            return Malformed(f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}", size)
        try:
            return raw.decode("utf-8"), size
        except UnicodeDecodeError:
            return Malformed("payload is not UTF-8", size)
    size = _utf8_size(raw)
    if size > MAX_PAYLOAD_BYTES:
        return Malformed(f"payload of {size} bytes exceeds {MAX_PAYLOAD_BYTES}", size)
    return raw, size


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # Lone surrogates cannot come from PostgreSQL; count them as the worst case.
        return len(text) * 4


def _probe(data: dict[str, object], size: int) -> Payload:
    nonce = data[_PROBE_KEY]
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= 128:
        return Malformed("probe nonce must be a string of 1-128 characters", size)
    return Probe(nonce)


def _doorbell(data: dict[str, object], size: int) -> Payload:
    version = data.get("v")
    # bool is an int subclass: `true` must not pass for version 1.
    if type(version) is not int or version != 1:
        return Malformed(f"unknown payload version {_shorten(version)}", size)
    numbers: dict[str, int] = {}
    for key in ("first_id", "last_id", "count"):
        value = data.get(key)
        if type(value) is not int:
            return Malformed(f"{key} must be an integer, got {_shorten(value)}", size)
        if not 0 < value <= MAX_ID:
            return Malformed(f"{key} must be between 1 and 2**63-1, got {_shorten(value)}", size)
        numbers[key] = value
    first_id, last_id, count = numbers["first_id"], numbers["last_id"], numbers["count"]
    if last_id < first_id:
        return Malformed(f"id range is inverted: first_id {first_id} > last_id {last_id}", size)
    if count > last_id - first_id + 1:
        return Malformed(f"count {count} does not fit in ids {first_id}..{last_id}", size)
    return Doorbell(v=1, first_id=first_id, last_id=last_id, count=count)


def _shorten(value: object) -> str:
    """A bounded repr for reasons: reasons end up in logs."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
