"""Notification destinations (NOTICE_URLS) through apprise, without ever leaking a URL.

A destination URL is a credential: Slack and Mattermost webhooks carry their token in
the path, others a password or an API key.  So a URL never leaves this module in any
form: the database and the logs name a destination by a SHA-256 of its URL and a label
made of its position, its service name and a prefix of that hash.

apprise (and urllib3 under it) log the full URL at DEBUG and an unparseable one even at
ERROR, so their loggers are cut off from the process' handlers (`quiet_libraries`):
what apprise says about one send is taken from that send's own result, scrubbed of
every piece of the URL, and logged by us.
"""

from __future__ import annotations

import hashlib
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Final, Literal

NoticeType = Literal["info", "success", "warning", "failure"]

# One send may take at most this long (apprise's per-call timeout), so a claim's lease
# (listener/notices.py) always outlives a live sender.
SEND_TIMEOUT_SECONDS: Final = 20.0
_MAX_REASON_CHARS: Final = 300
# Pieces of a URL shorter than this are not scrubbed from messages ("https", "443").
_MIN_SECRET_PIECE: Final = 4
# Separators of NOTICE_URLS: blanks, or a comma that starts another URL (apprise URLs
# may hold commas of their own, e.g. several recipients).
_SEPARATOR = re.compile(r"\s+|,\s*(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]{0,31})://")
_HASH_CONTEXT: Final = b"token-reset notice destination\x00"


class DestinationError(ValueError):
    """A NOTICE_URLS entry apprise cannot send to; the message names no part of it."""


@dataclass(frozen=True)
class Destination:
    """One configured destination.  `url` is excluded from repr: it is a secret."""

    index: int
    url: str = field(repr=False)
    digest: str
    service: str

    @property
    def label(self) -> str:
        """What logs, the database and `notify --test` call it: nothing secret."""
        return f"#{self.index} {self.service} {self.digest[:12]}"

    def scrub(self, text: str) -> str:
        """`text` with every piece of this destination's URL replaced by ***."""
        for piece in sorted(_secret_pieces(self.url), key=len, reverse=True):
            text = text.replace(piece, "***")
        return text


@dataclass(frozen=True)
class SendResult:
    """One send's outcome; `reason` is scrubbed and short."""

    ok: bool
    reason: str = ""


def split_urls(raw: str) -> tuple[str, ...]:
    """NOTICE_URLS as a list: separated by blanks, newlines or commas before a scheme."""
    return tuple(part for part in _SEPARATOR.split(raw.strip()) if part)


def destination_digest(url: str) -> str:
    """The stable identity of a destination: SHA-256 of its URL (hex)."""
    return hashlib.sha256(_HASH_CONTEXT + url.encode()).hexdigest()


def quiet_libraries() -> None:
    """Keep apprise's and urllib3's own log records (which name URLs) out of our logs."""
    for name in ("apprise", "urllib3"):
        logger = logging.getLogger(name)
        logger.propagate = False
        if not logger.handlers:
            # Without a handler Python's last-resort handler would print to stderr.
            logger.addHandler(logging.NullHandler())


def load_destinations(urls: tuple[str, ...]) -> tuple[Destination, ...]:
    """Check every URL with apprise; raises DestinationError naming only its position."""
    quiet_libraries()
    import apprise  # noqa: PLC0415  # heavy, and only needed when destinations exist

    found: list[Destination] = []
    seen: set[str] = set()
    for index, url in enumerate(urls, start=1):
        plugin = apprise.Apprise.instantiate(url, asset=_asset(apprise))
        if plugin is None:
            scheme = _SCHEME.match(url)
            shown = f" ({scheme.group(1).lower()}://…)" if scheme else ""
            raise DestinationError(
                f"NOTICE_URLS: destination #{index}{shown} is not a URL apprise can send to "
                "(see https://github.com/caronc/apprise/wiki for the syntax)"
            )
        digest = destination_digest(url)
        if digest in seen:
            raise DestinationError(f"NOTICE_URLS: destination #{index} repeats an earlier one")
        seen.add(digest)
        found.append(Destination(index, url, digest, str(plugin.service_name)))
    return tuple(found)


def send(
    destination: Destination,
    *,
    title: str,
    body: str,
    notice_type: NoticeType,
    timeout: float = SEND_TIMEOUT_SECONDS,
) -> SendResult:
    """Blocking: one message to one destination (call it from a worker thread)."""
    quiet_libraries()
    import apprise  # noqa: PLC0415

    client = apprise.Apprise(asset=_asset(apprise))
    if not client.add(destination.url):
        return SendResult(False, "apprise refused the URL")
    try:
        result = client.notify(
            body=body,
            title=title,
            notify_type=notice_type,
            body_format=apprise.NotifyFormat.TEXT,
            timeout=timeout,
        )
    except Exception as exc:  # a plugin's own bug must not kill the notifier
        return SendResult(False, _short(destination.scrub(f"{type(exc).__name__}: {exc}")))
    if result:
        return SendResult(True)
    messages = [entry.message for entry in result.logs() if entry.level in ("WARNING", "ERROR")]
    reason = "; ".join(messages) or f"not delivered ({result.status})"
    return SendResult(False, _short(destination.scrub(reason)))


def _asset(apprise: Any) -> Any:
    """Sequential sends in the calling thread, nothing written to disk, URLs masked."""
    return apprise.AppriseAsset(
        async_mode=False,
        secure_logging=True,
        storage_mode=apprise.PersistentStoreMode.MEMORY,
    )


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 1] + "…"


def _secret_pieces(url: str) -> set[str]:
    """Every piece of a URL that may be (part of) a secret: all but its scheme."""
    pieces = {url}
    _, _, rest = url.partition("://")
    pieces.add(rest)
    parsed = urllib.parse.urlsplit(url)
    candidates = [parsed.netloc, parsed.path, parsed.query, parsed.fragment]
    candidates += re.split(r"[/@:?&=#,;]+", rest)
    for candidate in candidates:
        for piece in (candidate, urllib.parse.unquote(candidate)):
            pieces.add(piece.strip("/"))
    return {piece for piece in pieces if len(piece) >= _MIN_SECRET_PIECE}
