"""Every file the repository's text cites (.md, .sql, .py) exists in the repository.

Comments and docs that send a reader to a file that is not there (a design document
kept elsewhere, a migration that was folded into another) are worse than none: the
reader trusts them.  This scans every text file git knows (tracked and new, minus
ignored ones) for references to .md/.sql/.py files and to migrations by number
("0004's header"), and fails on any it cannot find.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIGRATIONS = REPO / "sql" / "migrations"

# A path-like token ending in .md/.sql/.py, not inside a longer word or path.
FILE_REFERENCE = re.compile(r"(?<![\w./-])((?:\.{1,2}/)?[\w./-]*\w\.(?:md|sql|py))(?![\w/-])")
# A migration cited by number: "0004's header", "migration 0004".
MIGRATION_NUMBER = re.compile(r"\b(\d{4})'s\b|\bmigrations? (\d{4})\b")

# Tokens that look like file names but are not references, each with its reason.
NOT_FILES = {
    "FILE.sql": "placeholder of bench's `--patch FILE.sql` usage",
    "NNNN_snake_case.sql": "the migrations' naming pattern",
    "script.sql": "the pgbench script bench/listener_lag.py writes at run time",
    "migration.sql": "attribute access (Migration.sql) in listener/migrate.py and bench",
    "self.sql": "attribute access in listener/sql.py",
    # Files tests/unit/test_sql_loader.py writes under its tmp_path.
    "0001_a.sql": "a loader test's temporary migration",
    "0002_b.sql": "a loader test's temporary migration",
    "0003_c.sql": "a loader test's temporary migration",
    "0002_twin.sql": "a loader test's temporary migration",
    "a.sql": "a loader test's temporary query file",
    "b.sql": "a loader test's temporary query file",
}
# (file, reference) pairs allowed to stay, each with its reason.
PENDING = {
    # Inside the database container: compose mounts deploy/postgres/roles.sql there.
    ("deploy/compose.yaml", "/etc/token-reset/roles.sql"): "container path of a mount",
    ("deploy/postgres/init-roles.sh", "/etc/token-reset/roles.sql"): "container path",
    # The runbook base URL is a placeholder each deployment replaces (rules.yml says how).
    (
        "deploy/prometheus/rules.yml",
        "//git.example/you/repo/blob/main/deploy/README.md",
    ): "example URL to replace",
    # Measured results record the --patch their run applied (git-ignored by design,
    # bench/README.md); a record of the run's inputs, not a pointer for a reader.
    ("bench/results/bulk_reset.json", "bench/results/patched/proposal.sql"): "run input",
    ("bench/results/write_path.json", "bench/results/patched/proposal.sql"): "run input",
}
# This file cites missing files on purpose (its own examples and allow-lists).
SELF = "tests/unit/test_references.py"


def text_files() -> Iterator[tuple[str, str]]:
    """(repo-relative path, text) of every text file git knows, minus ignored ones."""
    git = shutil.which("git")
    if git is None:
        pytest.fail("git not found on PATH: the scan lists the repository's files with it")
    listed = subprocess.run(
        [git, "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree, not yet in the index
        try:
            yield name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # a picture, not text


def repo_files() -> set[str]:
    """Every file's repo-relative path."""
    return {name for name, _ in text_files()} | {
        str(p.relative_to(REPO)) for p in (REPO / "bench" / "results").glob("*")
    }


def exists(reference: str, cited_in: str, files: set[str]) -> bool:
    """A reference resolves next to the citing file, from the root, or as a path's tail."""
    near = (REPO / cited_in).parent / reference
    if near.resolve().is_file() and near.resolve().is_relative_to(REPO):
        return True
    tail = reference.lstrip("./")
    return any(name == tail or name.endswith("/" + tail) for name in files)


def dangling() -> list[tuple[str, int, str]]:
    """(file, line, reference) for every reference to a file the repository lacks."""
    files = repo_files()
    migrations = {p.name[:4] for p in MIGRATIONS.glob("*.sql")}
    found = []
    for name, text in text_files():
        if name == SELF:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for match in FILE_REFERENCE.finditer(line):
                reference = match.group(1)
                if reference in NOT_FILES or (name, reference) in PENDING:
                    continue
                if not exists(reference, name, files):
                    found.append((name, number, reference))
            for match in MIGRATION_NUMBER.finditer(line):
                migration = match.group(1) or match.group(2)
                if migration not in migrations and (name, migration) not in PENDING:
                    found.append((name, number, f"migration {migration}"))
    return found


def test_every_cited_file_exists_in_the_repository() -> None:
    """No comment, doc, test or deploy file cites a file the repository does not contain."""
    missing = dangling()
    assert not missing, "references to files the repository does not contain:\n" + "\n".join(
        f"  {name}:{line}: {reference}" for name, line, reference in missing
    )


def test_the_scan_sees_a_missing_file_and_a_missing_migration() -> None:
    """The patterns catch what this test exists for (so a passing scan means something)."""
    line = "names are NOTES.md section 4's contract; see 0004's header and sql/queries/x.sql"
    assert [m.group(1) for m in FILE_REFERENCE.finditer(line)] == ["NOTES.md", "sql/queries/x.sql"]
    assert [m.group(1) for m in MIGRATION_NUMBER.finditer(line)] == ["0004"]
    files = repo_files()
    assert exists("listener/service.py", "README.md", files)
    assert exists("../README.md", "deploy/README.md", files)
    assert not exists("NOTES.md", "listener/metrics.py", files)


def test_not_files_are_still_cited() -> None:
    """Every allow-listed token still occurs somewhere: the list never outlives its reason."""
    texts = [text for name, text in text_files() if name != SELF]
    unused = [token for token in NOT_FILES if not any(token in text for text in texts)]
    assert not unused
