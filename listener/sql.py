"""Loads the SQL that lives in sql/: numbered migrations and named queries.

SQL stays in .sql files (readable, lintable, greppable) and Python passes values as
$n parameters; nothing is built in f-strings.  Installed wheels carry the folder as
``listener/sql``; a source checkout reads the top-level ``sql/``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

# Checksums recorded by releases that hashed the whole text, comments included.
RELEASED_CHECKSUMS = {
    1: "6bc27bd31e44ca2669975318eb7fc2de95ab694785441d0251f2952493f0d6c4",
    2: "47aee91fb2b6a86181e26e4acac667a1690e2b4ff2e428164a9a2dc9bce703bb",
    3: "3d2970d1ffe2e9a0856fec087981327395e5857d2990aed678fec3df3ddf43d7",
}
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_QUERY_HEADER = re.compile(r"^-- name: (?P<name>[a-z0-9_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Migration:
    """One numbered, append-only migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the code: an edited, already-applied migration is caught.

        Lines that are only a comment are left out, so a comment can be corrected (a
        reference to a file that moved) without making every database refuse the file.
        """
        code = "\n".join(
            line.rstrip() for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return hashlib.sha256(code.encode()).hexdigest()

    def accepts(self, recorded: str) -> bool:
        """True when `recorded` is this migration's checksum, now or as first released."""
        return recorded in (self.checksum, RELEASED_CHECKSUMS.get(self.version))


def sql_root() -> Traversable:
    """The sql/ folder, from the installed package or the source checkout."""
    packaged = resources.files("listener") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


@cache
def migrations() -> tuple[Migration, ...]:
    """All migrations in version order; refuses gaps and duplicates."""
    found: list[Migration] = []
    for entry in (sql_root() / "migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(int(match["version"]), match["name"], entry.read_text(encoding="utf-8"))
        )
    found.sort(key=lambda m: m.version)
    expected = list(range(1, len(found) + 1))
    if [m.version for m in found] != expected:
        names = [f"{m.version:04d}_{m.name}" for m in found]
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, got {names}")
    return tuple(found)


@cache
def queries() -> dict[str, str]:
    """Named queries from sql/queries/*.sql (one file per topic), split on ``-- name: x``."""
    named: dict[str, str] = {}
    files = sorted((sql_root() / "queries").iterdir(), key=lambda entry: entry.name)
    for entry in files:
        if not entry.name.endswith(".sql"):
            continue
        parts = _QUERY_HEADER.split(entry.read_text(encoding="utf-8"))
        # parts = [preamble, name1, body1, name2, body2, ...]
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in named:
                raise RuntimeError(f"query {name!r} is defined twice (again in {entry.name})")
            named[name] = body.strip().rstrip(";")
    return named


def query(name: str) -> str:
    """The SQL text of one named query; a typo fails loudly, not at run time in prod."""
    try:
        return queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in sql/queries/") from None
