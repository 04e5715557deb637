"""Tinker start-up and background endpoints: client config, sessions, heartbeats,
telemetry, capabilities, health."""

from __future__ import annotations

import json
import uuid
from typing import Any

import structlog
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from tinker import types as tt

from audit.models import ClientSession, utcnow
from gateway.context import Ctx, JsonBody, OptionalJsonBody, parse
from gateway.errors import Forbidden
from gateway.ownership import owned

router = APIRouter(prefix="/api/v1")

# Stated explicitly so no optional endpoint is ever needed and no user code is uploaded.
CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "custom_loss_server_side": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "proto_compress_fwdbwd": False,
    "billing_exception_max_pause_duration_sec": 0,
}


@router.post("/client/config", name="client_config")
def client_config(ctx: Ctx) -> dict[str, Any]:
    return CLIENT_CONFIG


@router.post("/client/dynamic_config", name="client_dynamic_config")
def client_dynamic_config(ctx: Ctx) -> dict[str, Any]:
    return {"sample_cancel_enabled": False}


@router.get("/healthz", name="healthz")
def healthz(ctx: Ctx) -> dict[str, str]:
    return {"status": "ok"}


@router.get("/get_server_capabilities", name="get_server_capabilities")
def get_server_capabilities(ctx: Ctx) -> dict[str, Any]:
    models = [
        tt.SupportedModel(model_name=info.name, max_context_length=info.max_context,
                          trainable=True, sampleable=True)
        for info in ctx.state.models.values()
    ]
    return tt.GetServerCapabilitiesResponse(supported_models=models).model_dump(mode="json")


@router.post("/create_session", name="create_session")
def create_session(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.CreateSessionRequest, body)
    session_id = f"sess-{uuid.uuid4().hex[:20]}"
    ctx.session.add(ClientSession(
        id=session_id, principal_id=ctx.principal.id, sdk_version=req.sdk_version[:40],
        display_name=(req.display_name or None), tags=json.dumps(req.tags),
        user_metadata=json.dumps(req.user_metadata or {}),
    ))
    ctx.note(subject=session_id, sdk_version=req.sdk_version)
    return tt.CreateSessionResponse(session_id=session_id).model_dump(mode="json")


@router.post("/session_heartbeat", name="session_heartbeat")
def session_heartbeat(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.SessionHeartbeatRequest, body)
    session = owned(ctx, ClientSession, req.session_id, "session")
    if session.finished_at is not None:
        return JSONResponse({"detail": "session finished"}, status_code=410)  # type: ignore[return-value]
    session.last_heartbeat_at = utcnow()
    ctx.note(subject=req.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish", name="finish_session")
def finish_session(session_id: str, ctx: Ctx, body: OptionalJsonBody = None) -> dict:
    session = owned(ctx, ClientSession, session_id, "session")
    reason = body.get("reason") if isinstance(body, dict) else None
    kind = reason.get("type") if isinstance(reason, dict) else None
    session.finished_at = utcnow()
    session.finish_reason = str(kind)[:40] if kind else "unknown"
    ctx.note(subject=session_id, reason=session.finish_reason)
    return {}


@router.post("/telemetry", name="telemetry")
def telemetry(ctx: Ctx, body: JsonBody) -> dict[str, str]:
    # SDK telemetry (client-side exceptions, session events) is useful to operators, but it
    # can echo the caller's X-API-Key and carry arbitrary data: the audit row only counts
    # it, and the log keeps a summary whose text is redacted (gateway.logs).
    events = body.get("events") if isinstance(body, dict) else None
    events = events if isinstance(events, list) else []
    ctx.note(events=len(events))
    for event in events[:MAX_TELEMETRY_LOGGED]:
        if isinstance(event, dict):
            telemetry_log.info("sdk telemetry", **_telemetry_summary(event))
    return tt.TelemetryResponse(status="accepted").model_dump(mode="json")


MAX_TELEMETRY_LOGGED = 20
telemetry_log = structlog.get_logger("loragate.telemetry")


def _telemetry_summary(event: dict[str, Any]) -> dict[str, Any]:
    """Names, severity and a short error message; never `event_data` values."""
    # "event" is the log line's own field name, so the SDK's goes in as sdk_event.
    summary: dict[str, Any] = {f"sdk_{k}" if k == "event" else k: str(event[k])[:100]
                               for k in ("event", "event_name", "severity", "error_type")
                               if k in event}
    if "error_message" in event:
        summary["error_message"] = str(event["error_message"])[:300]
    data = event.get("event_data")
    if isinstance(data, dict):
        summary["event_data_keys"] = sorted(str(k) for k in data)[:20]
    return summary


@router.post("/create_custom_loss", name="create_custom_loss")
def create_custom_loss(ctx: Ctx) -> None:
    raise Forbidden("server-side custom losses are not offered: no user code runs on this "
                    "server; forward_backward_custom computes the loss in your process")
