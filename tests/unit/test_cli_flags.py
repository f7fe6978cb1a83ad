"""Flags go through the validators of the variables they override: one line, exit 2."""

from __future__ import annotations

import pytest

from listener.cli import build_parser

PASSWORD = "hQmZrKtWvXyPnLsJ"


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["listen", "--http-port", "99999"], "--http-port"),
        (["listen", "--http-port", "eighty"], "--http-port"),
        (["demo", "--http-port", "-1"], "--http-port"),
        (["reset", "--batch-size", "0"], "--batch-size"),
        (["status", "--log-level", "LOUD"], "--log-level"),
        (
            ["migrate", "--database-url", f"postgresql://app:{PASSWORD}@db:99999/app"],
            "--database-url",
        ),
        (["listen", "--database-url", "notaurl"], "--database-url"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse `type=` is the config validator: exit 2, one line, the value not echoed."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert named in line
    assert PASSWORD[:8] not in line


def test_good_flags_are_normalised() -> None:
    """--log-level is case-insensitive; --http-port 0 picks a free port."""
    args = build_parser().parse_args(["listen", "--log-level", "debug", "--http-port", "0"])
    assert (args.log_level, args.http_port) == ("DEBUG", 0)
