"""Database URLs: checked without connecting, printed without their credentials.

A DATABASE_URL is a secret (it usually carries the password), so nothing here ever
echoes one: error messages say what is wrong, not what was written, and every place
that prints a URL prints `redact_dsn(url)` (the password, and a ``password=`` query
value, become ``***``).  `check_dsn` refuses what would otherwise fail at connect time
with a traceback, over and over in `listen`'s reconnect loop: a scheme other than
postgresql/postgres, a port outside 1-65535, unbalanced brackets around an IPv6 host,
and whatever else asyncpg's own parser refuses.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg.connect_utils

SCHEMES = ("postgresql", "postgres")
REDACTED = "***"
DEFAULT_PORT = 5432
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# key=value settings that are secrets, in a URL query or a libpq keyword string.
_SECRET_KEYS = r"(?:ssl)?password"  # noqa: S105  # a pattern, not a password
_SECRET_QUERY = re.compile(rf"(?P<key>[?&]{_SECRET_KEYS}=)[^&#]*", re.IGNORECASE)
_SECRET_KEYWORD = re.compile(rf"(?P<key>\b{_SECRET_KEYS}\s*=\s*)(?:'[^']*'|\S+)", re.IGNORECASE)


def redact_dsn(url: str) -> str:
    """The URL with its password (and any ``password=`` setting) replaced by ***.

    Works on malformed URLs too (they are the ones that end up in error messages): the
    user information is taken up to the *last* ``@``, so an unencoded ``@`` or ``/`` in
    a password over-redacts rather than leaks.
    """
    match = _SCHEME.match(url)
    if match is None:
        return _SECRET_KEYWORD.sub(rf"\g<key>{REDACTED}", url)
    head, rest = url[: match.end()], url[match.end() :]
    userinfo, at, tail = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:{REDACTED}@{tail}"
    return head + _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", rest)


def redact_url(url: str) -> str:
    """Any URL with its whole user information replaced by *** (user:pass@ or token@)."""
    match = _SCHEME.match(url)
    if match is None:
        return url
    head, rest = url[: match.end()], url[match.end() :]
    _userinfo, at, tail = rest.rpartition("@")
    if at:
        rest = f"{REDACTED}@{tail}"
    return head + _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", rest)


def check_dsn(url: str) -> None:
    """Raise ValueError (a message free of the URL's text) unless asyncpg can use `url`."""
    match = _SCHEME.match(url)
    if match is None or match["scheme"].lower() not in SCHEMES:
        raise ValueError("must be a URL starting with postgresql:// or postgres://")
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(
            "cannot be parsed as a URL (unbalanced [ ] around an IPv6 host, or a bad query)"
        ) from None
    for _host, port in _host_ports(parts.netloc.rpartition("@")[2]):
        _check_port(port)
    for key, value in query:
        if key == "port":
            for port in value.split(","):
                _check_port(port)
    _check_with_asyncpg(url)


def hosts(url: str) -> list[str]:
    """``host:port`` of each server the URL names, for messages (no credentials)."""
    try:
        hostlist = urlsplit(url).netloc.rpartition("@")[2]
        pairs = list(_host_ports(hostlist)) if hostlist else []
        for _host, port in pairs:
            _check_port(port)  # else the "port" may be part of a password
    except ValueError:
        return []
    return [f"{unquote(host) or 'localhost'}:{port or DEFAULT_PORT}" for host, port in pairs]


def _host_ports(hostlist: str) -> Iterator[tuple[str, str]]:
    """(host, port) of each comma-separated ``host[:port]``, ``[v6][:port]`` entry."""
    for spec in hostlist.split(","):
        if spec.startswith("["):
            host, closed, rest = spec[1:].partition("]")
            if not closed or "[" in host or "[" in rest or "]" in rest:
                raise ValueError("has unbalanced [ ] around an IPv6 host")
            if rest and not rest.startswith(":"):
                raise ValueError("has text after the ] of an IPv6 host")
            yield f"[{host}]", rest[1:]
        elif "[" in spec or "]" in spec:
            raise ValueError("has unbalanced [ ] around an IPv6 host")
        else:
            host, _, port = spec.partition(":")
            yield host, port


def _check_port(port: str) -> None:
    # The text is never echoed: with an unencoded "/" in a password, what urlsplit
    # calls the port is part of the password.
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError("has a port that is not a number from 1 to 65535")


def _check_with_asyncpg(url: str) -> None:
    """Whatever else asyncpg refuses (sslmode, target_session_attrs, ...), without connecting.

    asyncpg has no public "parse only" call; its private parser is used when present,
    with every argument but the DSN left unset (it reads PG* variables as connect does).
    """
    parse: Any = getattr(asyncpg.connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        return
    arguments: dict[str, Any] = dict.fromkeys(inspect.signature(parse).parameters)
    arguments["dsn"] = url
    try:
        parse(**arguments)
    except (ValueError, TypeError, LookupError, OSError) as exc:
        # ClientConfigurationError is a ValueError.  Its message can quote a query
        # value, so it is shown only when it holds no secret of the URL.
        message = (str(exc).strip().splitlines() or ["invalid"])[0]
        if any(secret in message for secret in _secrets(url)):
            message = "its message is withheld (it may quote the password)"
        raise ValueError(f"is refused by asyncpg: {redact_dsn(message)}") from None


def _secrets(url: str) -> set[str]:
    """The password and ``password=`` values of `url`, raw and percent-decoded."""
    found: set[str] = set()
    match = _SCHEME.match(url)
    userinfo, at, _ = url[match.end() if match else 0 :].rpartition("@")
    if at and ":" in userinfo:
        found.add(userinfo.partition(":")[2])
    for setting in _SECRET_QUERY.finditer(url):
        found.add(setting[0][len(setting["key"]) :])
    return {secret for raw in found for secret in (raw, unquote(raw)) if secret}
