"""Database URLs are checked without connecting and printed without their credentials."""

from __future__ import annotations

import pytest

from listener.dsn import check_dsn, hosts, redact_dsn, redact_url

PASSWORD = "hQmZrKtWvXyPnLsJ"


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"postgresql://app:{PASSWORD}@db:5432/app", "postgresql://app:***@db:5432/app"),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("postgresql:///app", "postgresql:///app"),
        # Malformed ones are the ones that end up in error messages.
        (f"postgresql://app:{PASSWORD}@[::1/x", "postgresql://app:***@[::1/x"),
        (f"postgresql://app:{PASSWORD}@db:99999/x", "postgresql://app:***@db:99999/x"),
        # An unencoded @ or / in the password over-redacts, never leaks.
        (f"postgresql://app:a@{PASSWORD}@db/app", "postgresql://app:***@db/app"),
        (f"postgresql://app:a/{PASSWORD}@db/app", "postgresql://app:***@db/app"),
        (
            f"postgres://db/app?user=app&password={PASSWORD}&sslmode=require",
            "postgres://db/app?user=app&password=***&sslmode=require",
        ),
        (f"host=db password={PASSWORD} dbname=app", "host=db password=*** dbname=app"),
        ("notaurl", "notaurl"),
    ],
)
def test_redact_dsn_hides_the_password_and_nothing_else(url: str, redacted: str) -> None:
    """The password and password= settings become ***; user, host, port, database stay."""
    assert redact_dsn(url) == redacted


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        (f"https://am:{PASSWORD}@alerts:9093/", "https://***@alerts:9093/"),
        (f"https://{PASSWORD}@alerts/", "https://***@alerts/"),
        ("http://alerts:9093", "http://alerts:9093"),
    ],
)
def test_redact_url_hides_all_user_information(url: str, redacted: str) -> None:
    """In an HTTP URL the user part can be a token by itself: all of it goes."""
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        f"mysql://app:{PASSWORD}@db/app",
        f"postgresql://app:{PASSWORD}@db:99999/app",
        f"postgresql://app:{PASSWORD}@db:0/app",
        f"postgresql://app:{PASSWORD}@db:port/app",
        f"postgresql://app:{PASSWORD}@[::1/x",
        f"postgresql://app:{PASSWORD}@::1]/x",
        f"postgresql://app:{PASSWORD}@[::1]x/app",
        f"postgresql://app:ab/{PASSWORD}@db/app",
        f"postgresql://app:{PASSWORD}@db/app?port=70000",
        f"postgresql://app:{PASSWORD}@db/app?sslmode=sometimes",
        f"postgresql://app:{PASSWORD}@db/app?target_session_attrs={PASSWORD}",
    ],
)
def test_check_dsn_refuses_without_echoing(url: str) -> None:
    """What would fail at connect time fails here, and the message quotes none of the URL."""
    with pytest.raises(ValueError, match=r"\w") as refused:
        check_dsn(url)
    message = str(refused.value)
    assert PASSWORD[:8] not in message
    assert "app" not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:pw@db:5432/app",
        "postgres://db/app",
        "postgresql:///app",
        "postgresql://%2Fvar%2Frun%2Fpostgresql/app",
        "postgresql://app@[::1]:6432/app?sslmode=disable",
        "postgresql://app@db1:5432,db2:5433/app?target_session_attrs=read-write",
        "postgresql://app@db/app?port=6432&application_name=x",
    ],
)
def test_check_dsn_accepts_what_asyncpg_accepts(url: str) -> None:
    """Unix sockets, IPv6, several hosts and query settings are all fine."""
    check_dsn(url)


def test_hosts_name_the_servers_for_messages() -> None:
    """host:port of each server (default port 5432), never credentials."""
    assert hosts(f"postgresql://app:{PASSWORD}@db/app") == ["db:5432"]
    assert hosts("postgresql://[::1]:6432,db2/app") == ["[::1]:6432", "db2:5432"]
    assert hosts("postgresql:///app") == []
    assert hosts(f"postgresql://app:ab/{PASSWORD}@db/app") == []
