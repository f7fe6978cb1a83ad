"""Parsing `Authorization: Bearer <secret>` and comparing it (no HTTP, no database)."""

from __future__ import annotations

import pytest

from listener.admin_api import bearer_token, disabled_reason, secret_matches

SECRET = "0123456789abcdef-secret"


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([f"Bearer {SECRET}"], SECRET),
        ([f"bearer {SECRET}"], SECRET),
        ([f"BeArEr {SECRET}"], SECRET),
        ([f"Bearer    {SECRET}"], SECRET),
        ([f" \tBearer\t{SECRET} \t"], SECRET),
        (["Bearer abc+/def=="], "abc+/def=="),
    ],
)
def test_well_formed_bearer_credentials_yield_the_token(values: list[str], expected: str) -> None:
    """The scheme is case-insensitive (RFC 7235) and blanks around the parts are tolerated."""
    assert bearer_token(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        ["Bearer"],
        ["Bearer "],
        ["Bearer  \t "],
        [SECRET],
        [f"Basic {SECRET}"],
        [f"Token {SECRET}"],
        [f"Bearer {SECRET} more"],
        [f"Bearer{SECRET}"],
        [f"Bearer\n{SECRET}"],
        [f"Bearer {SECRET}", f"Bearer {SECRET}"],
    ],
)
def test_malformed_credentials_yield_nothing(values: list[str]) -> None:
    """No header, no token, another scheme, extra parts or two headers: all refused."""
    assert bearer_token(values) is None


def test_secret_comparison_is_exact() -> None:
    """Equal bytes match; any prefix, suffix or case change does not."""
    assert secret_matches(SECRET, SECRET)
    assert not secret_matches(SECRET[:-1], SECRET)
    assert not secret_matches(SECRET + "x", SECRET)
    assert not secret_matches(SECRET.upper(), SECRET)
    assert not secret_matches("", SECRET)


def test_non_ascii_secret_matches_its_utf8_header_bytes() -> None:
    """Headers arrive latin-1 decoded; a UTF-8 secret still matches byte for byte."""
    secret = "pässwörd-with-umlauts-42"
    as_received = secret.encode("utf-8").decode("latin-1")
    assert secret_matches(as_received, secret)
    assert not secret_matches(secret, secret + "!")


def test_token_outside_latin1_never_matches() -> None:
    """A token that cannot have come from a header is simply wrong, not an error."""
    assert not secret_matches("€" * 20, "€" * 20)


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (None, "endpoint disabled: CRON_SECRET not configured"),
        ("", "endpoint disabled: CRON_SECRET not configured"),
        ("x" * 15, "endpoint disabled: CRON_SECRET shorter than 16 characters"),
        ("x" * 16, None),
    ],
)
def test_endpoint_is_armed_only_by_a_long_enough_secret(
    secret: str | None, expected: str | None
) -> None:
    """Unset or empty closes the endpoint; 16 characters is the minimum (config.py)."""
    assert disabled_reason(secret) == expected
