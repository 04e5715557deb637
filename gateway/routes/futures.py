"""`retrieve_future`: the long-poll through which every queued result comes back.

Holds the poll up to `long_poll_seconds` (under the SDK's 45 s read timeout) and then
answers 408 `try_again`, which the SDK re-polls silently. Results of forward/backward and
sampling are protobuf; failures are a 200 JSON `{"error", "category"}` so the SDK raises
at once instead of retrying. Never holds a database transaction while waiting. Once a
finished future's response has been sent to its owner, its request and result payloads
are purged (audit.retention); asking again is a 410 that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask
from tinker import types as tt

from audit import retention
from audit.db import transaction
from audit.models import Future
from gateway.context import Ctx, JsonBody, parse
from gateway.errors import Gone, NotFound
from gateway.state import AppState

router = APIRouter(prefix="/api/v1")
logger = logging.getLogger("loragate.futures")


@dataclass(frozen=True)
class FutureSnapshot:
    status: str
    result_format: str | None
    result: bytes | None
    error: str | None
    category: str | None
    purged: str | None = None  # why its payloads were purged (audit.retention), if they were


def _read(state: AppState, request_id: str, principal_id: str) -> FutureSnapshot | None:
    with transaction(state.read_factory) as session:
        fut = session.get(Future, request_id)
        if fut is None or fut.principal_id != principal_id:
            return None
        return FutureSnapshot(fut.status, fut.result_format, fut.result_payload,
                              fut.error_message, fut.error_category,
                              fut.result_format if retention.is_purged(fut) else None)


@router.post("/retrieve_future", name="retrieve_future")
async def retrieve_future(ctx: Ctx, body: JsonBody) -> Response:
    req = parse(tt.FutureRetrieveRequest, body)
    state = ctx.state
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.long_poll_seconds
    with state.completions.watch(req.request_id) as resolved:
        while True:
            snap = await run_in_threadpool(_read, state, req.request_id, ctx.principal.id)
            if snap is None:
                raise NotFound(f"future {req.request_id} not found")
            ctx.note(subject=req.request_id, status=snap.status)
            if snap.purged is not None:
                raise Gone(purged_message(state, req.request_id, snap.purged))
            if snap.status in ("done", "failed"):
                response = _result_response(snap)
                response.background = BackgroundTask(_purge_delivered, state, req.request_id)
                return response
            remaining = deadline - loop.time()
            if remaining <= 0:
                return JSONResponse({"type": "try_again", "request_id": req.request_id,
                                     "queue_state": "active"}, status_code=408)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resolved.wait(), min(remaining, state.recheck_seconds))
            resolved.clear()


def purged_message(state: AppState, request_id: str, why: str) -> str:
    """The 410's message for a future whose payloads were purged."""
    what = retention.why_purged(why, state.settings.payload_retention_days)
    return (f"the result of {request_id} {what}: request and result payloads are not kept "
            "(their SHA-256 digests stay in the audit trail). Submit the request again, "
            "with a new seq_id, if you need its result")


def _purge_delivered(state: AppState, request_id: str) -> None:
    """Runs once the response carrying the result has been sent; a failure leaves the
    payloads to the retention purge."""
    try:
        retention.purge_delivered(state.factory, request_id, actor="system")
    except Exception:
        logger.exception("purging the delivered payloads of %s failed", request_id)


def _result_response(snap: FutureSnapshot) -> Response:
    if snap.status == "failed":
        return JSONResponse({"error": snap.error or "request failed",
                             "category": snap.category or "unknown"})
    media = "application/x-protobuf" if snap.result_format == "proto" else "application/json"
    return Response(content=snap.result or b"", media_type=media)
