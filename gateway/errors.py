"""One error hierarchy, one envelope, one mapping to HTTP.

Every refusal leaves the gateway as `{"detail": <message>, "code": <code>,
"request_id": <id>}` with a 4xx status the Tinker SDK does not retry (400, 401, 403, 404,
413, 422 — never 408/409/429/5xx/402 for a user's mistake; 429 only for a rate limit,
with Retry-After; 410 for a future whose purged result cannot come back), and leaves
exactly one audit row committed in its own transaction.
"""

from __future__ import annotations

from sqlalchemy.exc import DataError

from engine.errors import BodyTooLarge, UnknownModelError, UserInputError
from evals.release import ReleaseRefused
from policy.access import RequestNotFound
from policy.authz import PolicyNotFound
from policy.errors import KeyNotFound, KeyRejected, LimitExceeded, PolicyError
from policy.quotas import QuotaExceeded
from policy.scopes import ScopeDenied
from policy.screening.batch import ScreeningRefused
from policy.screening.tally import PrincipalNotFound, RunBlocked


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class OutsideScope(ApiError):
    status, code = 403, "outside_scope"


class QuotaError(ApiError):
    # 403, not 429: the SDK retries 429 for minutes, and a day budget does not come back
    # in minutes. The message names the quota and when it frees up.
    status, code = 403, "quota_exceeded"


class ScreeningError(ApiError):
    status, code = 403, "screening_refused"


class BlockedRun(ApiError):
    status, code = 403, "run_blocked"


class ReleaseError(ApiError):
    status, code = 403, "release_refused"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class Gone(ApiError):
    # A future whose payloads were purged (audit.retention): the result cannot come back.
    status, code = 410, "purged"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class RateLimited(ApiError):
    # The only 429 the gateway sends (see gateway.ratelimit): the SDK retries it, after
    # the Retry-After the response carries.
    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# Errors raised below the gateway, and their HTTP form. Checked in order: subclasses before
# the PolicyError catch-all.
_MAPPED: tuple[tuple[tuple[type[Exception], ...], type[ApiError]], ...] = (
    ((PolicyNotFound, KeyNotFound, RequestNotFound, PrincipalNotFound), NotFound),
    ((ScreeningRefused,), ScreeningError),
    ((RunBlocked,), BlockedRun),
    ((ReleaseRefused,), ReleaseError),
    ((QuotaExceeded,), QuotaError),
    ((ScopeDenied,), OutsideScope),
    ((KeyRejected,), Unauthorized),
    ((BodyTooLarge,), PayloadTooLarge),
    ((UserInputError, UnknownModelError, LimitExceeded), BadRequest),
    ((PolicyError,), Forbidden),
)


def to_api_error(exc: Exception) -> ApiError | None:
    """Map errors raised below the gateway to their HTTP form; None = not a user error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DataError):  # the database refused a value the caller sent
        return BadRequest("a value in this request cannot be stored or looked up: it contains "
                          "a NUL character or is longer than this server keeps")
    for sources, target in _MAPPED:
        if isinstance(exc, sources):
            return target(str(exc))
    return None
