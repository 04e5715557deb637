"""Admission: the one function every data-bearing request passes through before it is
queued.

`admit` runs the pluggable checks (screening hooks in via `AppState.admission_checks`),
deduplicates resubmits on (model_id, seq_id) or (sampler_id, seq_id) (a resubmit of a
request whose payloads were purged is a 410: its result is gone), reserves the
request's charge against the key's quotas (a resubmit reserves nothing twice), and
writes the future row (engine.queue.enqueue). `check_quota_first` is the cheap quota
check a route runs before expensive work such as screening. The audit entry for the
request is committed in the same transaction by the request context, so a reservation
exists exactly when its future does. Must not run models or contain policy rules itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit import retention
from audit.db import transaction
from audit.models import Future
from engine.queue import enqueue
from gateway.context import RequestContext
from gateway.errors import BadRequest, Gone
from policy import quotas
from policy.quotas import Charge


@dataclass
class AdmissionRequest:
    kind: str
    payload: bytes
    request_format: str = "json"
    model_id: str | None = None
    sampler_id: str | None = None
    seq_id: int | None = None
    charge: Charge = field(default_factory=Charge)
    audit: dict[str, Any] = field(default_factory=dict)


def admit(ctx: RequestContext, req: AdmissionRequest) -> str:
    """Queue the request and return its request_id (the existing one for a resubmit)."""
    for check in ctx.state.admission_checks:
        check(ctx, req)
    digest = hashlib.sha256(req.payload).hexdigest()
    existing = _find_duplicate(ctx.session, req)
    if existing is not None:
        _refuse_purged_resubmit(ctx, req, existing)
        if existing.principal_id != ctx.principal.id or existing.request_payload != req.payload:
            scope = req.model_id or req.sampler_id
            raise BadRequest(f"seq_id {req.seq_id} of {scope} was already used by a different "
                             "request; sequence ids must be unique per client")
        ctx.note(subject=req.model_id or req.sampler_id or "", kind=req.kind,
                 seq_id=req.seq_id, duplicate_of=existing.request_id, content_sha256=digest)
        return existing.request_id
    reservation = None
    if req.charge and ctx.api_key_id is not None:
        reservation = quotas.reserve(ctx.session, ctx.api_key_id, ctx.scopes, req.charge)
    request_id = enqueue(
        ctx.session, kind=req.kind, payload=req.payload, principal_id=ctx.principal.id,
        request_format=req.request_format, model_id=req.model_id, sampler_id=req.sampler_id,
        seq_id=req.seq_id, api_key_id=ctx.api_key_id,
        quota_reservation=reservation.to_json() if reservation else None).request_id
    ctx.note(subject=req.model_id or req.sampler_id or "", kind=req.kind, seq_id=req.seq_id,
             future=request_id, content_sha256=digest, **req.audit)
    if reservation is not None:
        ctx.note(reserved={k: v for k, v in asdict(reservation).items()
                           if k in ("training_tokens", "sampled_tokens", "checkpoint") and v}
                 | ({"run_slot": req.charge.new_run} if req.charge.new_run else {}))
    ctx.after_commit.append(ctx.state.wake_worker)
    return request_id


def _refuse_purged_resubmit(ctx: RequestContext, req: AdmissionRequest,
                            existing: Future) -> None:
    """A resubmit of the caller's request whose payloads were purged (audit.retention):
    it ran once and its result cannot come back, so it is refused (410) rather than
    mapped to a future that would only answer 410."""
    if existing.principal_id != ctx.principal.id or not retention.is_purged(existing):
        return
    why = retention.why_purged(existing.result_format,
                               ctx.state.settings.payload_retention_days)
    raise Gone(f"seq_id {req.seq_id} of {req.model_id or req.sampler_id} already ran as "
               f"{existing.request_id}, whose result {why}; send new work with a new seq_id")


def check_quota_first(ctx: RequestContext, req: AdmissionRequest) -> None:
    """The cheap quota check that runs before expensive work (screening, evaluation): a
    request the key has no quota left for is refused before that work starts (a resubmit,
    which reserves nothing, passes). Read-only, on its own short transaction; `admit`
    reserves for real."""
    if not req.charge or ctx.api_key_id is None:
        return
    with transaction(ctx.state.read_factory) as session:
        if _find_duplicate(session, req) is None:
            quotas.check(session, ctx.api_key_id, ctx.scopes, req.charge)


def _find_duplicate(session: Session, req: AdmissionRequest) -> Future | None:
    if req.seq_id is None or (req.model_id is None and req.sampler_id is None):
        return None
    stmt = select(Future).where(Future.seq_id == req.seq_id)
    if req.model_id is not None:
        stmt = stmt.where(Future.model_id == req.model_id)
    else:
        stmt = stmt.where(Future.sampler_id == req.sampler_id)
    return session.scalars(stmt).first()
