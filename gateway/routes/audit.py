"""Auditor access to the audit trail: filtered pages, a JSONL export that verifies
offline, and the Tinker-shaped `GET /api/v1/audit?day=` that the SDK's AdminClient reads.

The policy grants `audit, read` to auditors and admins. Entries are returned exactly as
stored (payload as its canonical JSON text) with their hashes. Must not change the log."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from audit import query
from audit.query import AuditFilter
from gateway.context import Ctx
from gateway.errors import BadRequest

router = APIRouter(prefix="/api/v1")

# The SDK's AdminClient asks for an event_type group; "checkpoints" are the events that
# create, read, move or delete adapter weights. This gateway has no projects or teams.
CHECKPOINT_EVENTS = tuple(f"{side}.{name}" for side in ("api", "engine") for name in (
    "save_weights", "save_weights_for_sampler", "load_weights", "load_weights_new",
    "save_weights_external", "external_weights_urls", "delete_checkpoint",
    "publish_checkpoint", "unpublish_checkpoint", "set_checkpoint_ttl"))
SDK_GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": (), "checkpoints": CHECKPOINT_EVENTS, "projects": None, "teams": None,
    "organizations": None}


def _time(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return query.normalize_time(value)
    except ValueError as exc:
        raise BadRequest(f"{name}: {exc}") from exc


def _filter(actor: str | None, api_key_id: str | None, training_run: str | None,
            event_type: str | None, decision: str | None, since: str | None,
            until: str | None, after_seq: int) -> AuditFilter:
    if after_seq < 0:
        raise BadRequest("after_seq must be >= 0")
    events = tuple(e for e in (event_type or "").split(",") if e)
    return AuditFilter(actor=actor, api_key_id=api_key_id, training_run=training_run,
                       event_types=events, decision=decision, since=_time(since, "since"),
                       until=_time(until, "until"), after_seq=after_seq)


def _described(flt: AuditFilter) -> dict[str, Any]:
    # Prefixed names: an auditor's query for a key must not itself match a search for
    # that key's requests (which looks for a top-level "api_key_id").
    return {f"by_{k}": v for k, v in flt.__dict__.items() if v}


@router.get("/audit/entries", name="audit_entries")
def audit_entries(ctx: Ctx, actor: str | None = None, api_key_id: str | None = None,
                  training_run: str | None = None, event_type: str | None = None,
                  decision: str | None = None, since: str | None = None,
                  until: str | None = None, after_seq: int = 0,
                  limit: int = 100) -> dict[str, Any]:
    """One page, by seq. Continue with `after_seq=next_after_seq` until it is null."""
    if not 1 <= limit <= query.MAX_PAGE:
        raise BadRequest(f"limit must be 1..{query.MAX_PAGE}")
    flt = _filter(actor, api_key_id, training_run, event_type, decision, since, until,
                  after_seq)
    entries = query.find(ctx.session, flt, limit)
    ctx.note(query=_described(flt), returned=len(entries))
    more = len(entries) == limit
    return {"entries": entries, "next_after_seq": entries[-1]["seq"] if more else None}


@router.get("/audit/export", name="audit_export")
def audit_export(ctx: Ctx, actor: str | None = None, api_key_id: str | None = None,
                 training_run: str | None = None, event_type: str | None = None,
                 decision: str | None = None, since: str | None = None,
                 until: str | None = None, after_seq: int = 0) -> StreamingResponse:
    """Every matching entry as JSON lines, with hashes (`loragate audit verify-export`)."""
    flt = _filter(actor, api_key_id, training_run, event_type, decision, since, until,
                  after_seq)
    ctx.note(query=_described(flt))
    # The stream reads on its own read-only session: the request's is closed by then.
    state = ctx.state

    def lines() -> Any:
        session = state.read_factory()
        try:
            yield from query.export(session, flt)
        finally:
            session.close()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/audit", name="audit_day")
def audit_day(ctx: Ctx, day: str | None = None, event_type: str = "all") -> dict[str, Any]:
    """The SDK's AdminClient.get_audit_log: one UTC day (today by default)."""
    if event_type not in SDK_GROUPS:
        raise BadRequest(f"event_type must be one of {', '.join(SDK_GROUPS)}")
    try:
        date = dt.date.fromisoformat(day) if day else dt.datetime.now(dt.UTC).date()
    except ValueError as exc:
        raise BadRequest("day must be a date like 2026-11-21") from exc
    group = SDK_GROUPS[event_type]
    if group is None:
        return {"entries": []}
    start = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
    flt = AuditFilter(event_types=group, since=_time(start.isoformat(), "day"),
                      until=_time((start + dt.timedelta(days=1)).isoformat(), "day"))
    ctx.note(day=date.isoformat(), event_type=event_type)
    return {"entries": [_sdk_entry(e) for e in query.export_entries(ctx.session, flt)]}


def _sdk_entry(e: dict[str, Any]) -> dict[str, Any]:
    details = {k: e[k] for k in ("seq", "actor", "subject", "decision", "request_id",
                                 "entry_hash", "prev_hash")}
    details["payload"] = json.loads(e["payload"])
    return {"timestamp": e["created_at"], "event": e["event_type"], "event_details": details}
