"""`NAME_FILE` variants of secret settings: read CRON_SECRET and DATABASE_URL from files.

Docker and Kubernetes hand secrets over as files (/run/secrets/..., a mounted Secret);
an environment variable leaks to `docker inspect`, /proc/<pid>/environ and crash
reports.  `with_secret_files(env)` returns the environment with each `NAME_FILE`
replaced by `NAME` holding the file's content (trailing newline removed; an empty
file is an empty value, which the settings treat as unset).  Setting both `NAME` and
`NAME_FILE` is refused: which one wins would be a guess.  Errors name the variable
and the path, never the content.

It takes the error class from its caller (listener.config's ConfigError) so the
settings module can call it in one line without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

SECRET_VARIABLES: Final = ("CRON_SECRET", "DATABASE_URL")
# A secret is short; a file this big is the wrong file, not a secret.
MAX_SECRET_BYTES: Final = 64 * 1024


def with_secret_files(
    env: Mapping[str, str], error: Callable[[str], Exception]
) -> Mapping[str, str]:
    """`env` with CRON_SECRET_FILE / DATABASE_URL_FILE resolved into their variables."""
    resolved: dict[str, str] | None = None
    for name in SECRET_VARIABLES:
        file_variable = f"{name}_FILE"
        path = env.get(file_variable, "").strip()
        if not path:
            continue
        if env.get(name, "").strip():
            raise error(f"set {name} and {file_variable} both: set only one of them")
        if resolved is None:
            resolved = dict(env)
        resolved[name] = _read(file_variable, Path(path), error)
    return env if resolved is None else resolved


def _read(variable: str, path: Path, error: Callable[[str], Exception]) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise error(f"{variable}: cannot read {path}: {reason}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise error(f"{variable}: {path} is larger than {MAX_SECRET_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{variable}: {path} is not UTF-8 text") from None
    return text.rstrip("\r\n")
