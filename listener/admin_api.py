"""`/api/admin/reset-monthly-tokens`: the cron endpoint (POST for curl, GET for Vercel Cron).

Order of checks, each cheaper than the next and none touching the database until
the caller is proven: secret configured (else 503, the endpoint is never open),
`Authorization: Bearer <secret>` well formed and equal in constant time (else 401),
then the bulk run.  The secret never reaches a log line or a response body.

Refusals are cheap for the caller, so they are logged at most once per
REFUSAL_LOG_INTERVAL_SECONDS (with the number swallowed since the last line); every
401 is counted in token_reset_admin_unauthorized_total.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

import structlog
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from listener.bulk import BulkResetError, run_bulk_reset
from listener.config import MIN_CRON_SECRET_LENGTH, Settings
from listener.metrics import Metrics
from listener.throttle import LogThrottle

RESET_PATH = "/api/admin/reset-monthly-tokens"

# RFC 7235: credentials = auth-scheme 1*SP token68; the scheme is case-insensitive, so
# "bearer" is accepted.  Surrounding blanks (and several between the two parts) are
# tolerated; anything else (no token, two tokens, other schemes) is malformed.
_CREDENTIALS = re.compile(r"[ \t]*([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)[ \t]+([^ \t]+)[ \t]*")
_NO_STORE = {"Cache-Control": "no-store"}
_CHALLENGE = {**_NO_STORE, "WWW-Authenticate": 'Bearer realm="token-reset"'}
REFUSAL_LOG_INTERVAL_SECONDS = 10.0

log = structlog.get_logger(__name__)


def bearer_token(values: Sequence[str]) -> str | None:
    """The token of exactly one well-formed `Authorization: Bearer <token>` header, else None."""
    if len(values) != 1:
        return None
    match = _CREDENTIALS.fullmatch(values[0])
    if match is None or match[1].lower() != "bearer":
        return None
    return match[2]


def secret_matches(token: str, secret: str) -> bool:
    """Constant-time comparison on bytes (headers arrive latin-1 decoded, the env is UTF-8)."""
    try:
        presented = token.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(presented, secret.encode("utf-8"))


def disabled_reason(secret: str | None) -> str | None:
    """Why the endpoint refuses every call (503), or None when it is armed."""
    if not secret:
        return "endpoint disabled: CRON_SECRET not configured"
    if len(secret) < MIN_CRON_SECRET_LENGTH:
        # `listen` refuses to start with such a secret; this guards other app builders.
        return f"endpoint disabled: CRON_SECRET shorter than {MIN_CRON_SECRET_LENGTH} characters"
    return None


def admin_routes(settings: Settings, metrics: Metrics) -> list[BaseRoute]:
    """The cron endpoint's routes, to mount on the service's one HTTP app."""
    secret = settings.cron_secret
    disabled = disabled_reason(secret)
    refused_log = LogThrottle(REFUSAL_LOG_INTERVAL_SECONDS)
    unauthorized_log = LogThrottle(REFUSAL_LOG_INTERVAL_SECONDS)

    async def reset(request: Request) -> Response:
        if request.method == "HEAD":
            # Starlette adds HEAD to GET routes; a probe must never start a reset.
            return Response(status_code=405, headers={"Allow": "GET, POST"})
        if disabled is not None or secret is None:
            suppressed = refused_log.admit()
            if suppressed is not None:
                log.warning(
                    "admin_reset_refused",
                    reason="not_configured",
                    method=request.method,
                    suppressed=suppressed,
                )
            return JSONResponse(
                {"success": False, "error": disabled}, status_code=503, headers=_NO_STORE
            )
        token = bearer_token(request.headers.getlist("authorization"))
        if token is None or not secret_matches(token, secret):
            metrics.admin_unauthorized.inc()
            suppressed = unauthorized_log.admit()
            if suppressed is not None:
                log.warning(
                    "admin_reset_unauthorized",
                    reason="missing_or_malformed" if token is None else "wrong_secret",
                    method=request.method,
                    client=request.client.host if request.client else None,
                    suppressed=suppressed,
                )
            return JSONResponse(
                {"success": False, "error": "unauthorized"}, status_code=401, headers=_CHALLENGE
            )
        try:
            result = await run_bulk_reset(settings, source="endpoint", metrics=metrics)
        except BulkResetError as exc:
            # The runner logged the stack; the client gets one line and the run id.
            return JSONResponse(
                {
                    "success": False,
                    "error": str(exc),
                    "run_id": str(exc.run_id),
                    "reset_count": exc.reset_count,
                    "batches": exc.batches,
                },
                status_code=500,
                headers=_NO_STORE,
            )
        except Exception:
            log.exception("admin_reset_error", method=request.method)
            return JSONResponse(
                {"success": False, "error": "internal error (see the service log)"},
                status_code=500,
                headers=_NO_STORE,
            )
        # A skipped call (another run holds the lock) is 200 too: the reset is being
        # done, and cron services treat non-2xx answers as failures that page someone.
        return JSONResponse(result.to_json(), status_code=200, headers=_NO_STORE)

    return [Route(RESET_PATH, reset, methods=["GET", "POST"])]
