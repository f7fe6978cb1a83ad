"""Secrets that cannot occur by chance, and the check that output holds none of them."""

from __future__ import annotations

import secrets
import string

# Letters only: no hex digest, UUID, timestamp or port number can contain a run of them.
_ALPHABET = string.ascii_letters
FRAGMENT = 8


def distinctive_secret(length: int = 64) -> str:
    """A random secret (a password, a CRON_SECRET) no log line contains unless it leaked."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def leaked_fragments(text: str, *secrets_: str) -> list[str]:
    """Every FRAGMENT-character piece of any secret that occurs in `text`."""
    return sorted(
        {
            secret[start : start + FRAGMENT]
            for secret in secrets_
            for start in range(len(secret) - FRAGMENT + 1)
            if secret[start : start + FRAGMENT] in text
        }
    )


def assert_no_secret(text: str, *secrets_: str) -> None:
    """Fail naming how much leaked (never the secret itself: test logs are output too)."""
    leaked = leaked_fragments(text, *secrets_)
    assert not leaked, f"{len(leaked)} {FRAGMENT}-character fragments of a secret in the output"
