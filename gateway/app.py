"""The app factory: lifespan state, request ids, routers, and the single place where
errors become HTTP responses (and denial audit rows)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from audit import log as audit_log
from audit.db import transaction
from engine.errors import EngineError
from gateway import console
from gateway.context import audit_path, route_event
from gateway.counters import REFUSAL_AUDIT_FAILURES
from gateway.errors import ApiError, NotFound, RateLimited, Unprocessable, to_api_error
from gateway.metrics import HttpMetricsMiddleware
from gateway.routes import (
    access,
    admin,
    audit,
    futures,
    metrics,
    release,
    rest,
    sampling,
    screening,
    service,
    training,
    usage,
)
from gateway.settings import Settings
from gateway.state import AppState, build_state
from policy.errors import PolicyError

logger = logging.getLogger("loragate.gateway")
request_log = structlog.get_logger("loragate.requests")
# A refusal's audit row is tried this often (the last try with a minimal payload) before
# the failure is logged and counted.
REFUSAL_AUDIT_ATTEMPTS = 3
REFUSAL_AUDIT_BACKOFF_SECONDS = 0.05


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(build_state, settings)
        app.state.loragate = state
        try:
            yield
        finally:
            await run_in_threadpool(state.close)

    # No generated docs routes: every route must pass the policy, and those would not.
    app = FastAPI(title="loragate", version="0.1.0", lifespan=lifespan, openapi_url=None,
                  docs_url=None, redoc_url=None)
    for module in (service, training, sampling, futures, rest, release, usage, audit, screening,
                   admin, access, metrics):
        app.include_router(module.router)
    console.install(app)  # the browser console's pages (gateway/console)
    app.middleware("http")(_assign_request_id)
    app.add_middleware(HttpMetricsMiddleware)  # outermost: times the whole request
    # User errors are handled inside the app; `Exception` (a bug) reaches Starlette's
    # server-error middleware, which logs the traceback.
    for exc_class in (ApiError, PolicyError, EngineError, RequestValidationError,
                      StarletteHTTPException, Exception):
        app.add_exception_handler(exc_class, _handle_error)
    return app


def api_routes(app: FastAPI) -> list[APIRoute]:
    """Every APIRoute, including those of included routers (kept nested by FastAPI)."""
    found: list[APIRoute] = []
    pending: list[object] = list(app.router.routes)
    while pending:
        route = pending.pop()
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            pending.extend(route.original_router.routes)
        elif hasattr(route, "routes"):
            pending.extend(route.routes)
    return found


async def _assign_request_id(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Give the request its id (the audit row's too), bind it to every log line written
    while it is handled, and log one line when it is answered."""
    request_id = f"req-{uuid.uuid4().hex}"
    request.state.request_id = request_id
    started = time.perf_counter()
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await call_next(request)
        principal = getattr(request.state, "principal", None)
        request_log.info("request", method=request.method, route=route_event(request),
                         status=response.status_code, principal=principal.id if principal
                         else None, seconds=round(time.perf_counter() - started, 4))
    response.headers["X-Request-Id"] = request_id
    return response


def _as_api_error(exc: Exception) -> ApiError | None:
    if isinstance(exc, RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ()))
        return Unprocessable(f"invalid request: {where}: {err.get('msg', 'malformed body')}")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound(f"no such endpoint: {exc.detail}")
        error = ApiError(str(exc.detail))
        error.status = exc.status_code
        return error
    return to_api_error(exc)


async def _handle_error(request: Request, exc: Exception) -> Response:
    api = _as_api_error(exc)
    if api is None:
        logger.exception("unhandled error", exc_info=exc)
    status, code = (api.status, api.code) if api else (500, "internal_error")
    message = api.message if api else "internal server error"
    request_id = getattr(request.state, "request_id", "")
    state: AppState | None = getattr(request.app.state, "loragate", None)
    if state is not None:
        await run_in_threadpool(_audit_refusal, state, request, status, code, message)
    if console.is_console(request):
        return console.error_response(request, status, message, request_id)
    headers = {"Retry-After": str(api.retry_after)} if isinstance(api, RateLimited) else None
    return JSONResponse({"detail": message, "code": code, "request_id": request_id},
                        status_code=status, headers=headers)


def _audit_refusal(state: AppState, request: Request, status: int, code: str,
                   message: str) -> None:
    """A refused request still leaves exactly one row, in its own transaction; a write
    that keeps failing is logged and counted (gateway.counters), never dropped silently."""
    principal = getattr(request.state, "principal", None)
    request_id = getattr(request.state, "request_id", "")
    entry: dict[str, Any] = {
        "actor": principal.id if principal else "anonymous", "event_type": route_event(request),
        "decision": "deny" if status < 500 else "error", "subject": audit_path(request),
        "request_id": request_id}
    payload = {"status": status, "code": code, "reason": message[:500],
               "method": request.method, "api_key_id": getattr(request.state, "api_key_id", None),
               "policy_version": state.authorizer.version}
    if _append_with_retries(state, entry, payload):
        return
    failures = REFUSAL_AUDIT_FAILURES.increment()
    logger.error("could not audit a refused request: request_id=%s status=%d code=%s "
                 "route=%.200s (%d such failures since start)", request_id, status, code,
                 entry["event_type"], failures)


def _append_with_retries(state: AppState, entry: dict[str, Any],
                         payload: dict[str, Any]) -> bool:
    """Append in a transaction of its own, retrying; the last try keeps only the status and
    code in the payload (in case the payload is what fails). False when every try failed."""
    for attempt in range(1, REFUSAL_AUDIT_ATTEMPTS + 1):
        last = attempt == REFUSAL_AUDIT_ATTEMPTS
        if last:
            payload = {"status": payload["status"], "code": payload["code"],
                       "audit_retries": attempt - 1}
        try:
            with transaction(state.factory) as session:
                audit_log.append(session, **entry, payload=payload)
            return True
        except Exception:
            logger.warning("writing the audit row of a refused request failed (attempt %d of "
                           "%d)", attempt, REFUSAL_AUDIT_ATTEMPTS, exc_info=True)
            if not last:
                time.sleep(REFUSAL_AUDIT_BACKOFF_SECONDS * attempt)
    return False
