"""The release gate over HTTP: ask for a checkpoint's release evaluation and follow it,
read its report, download released external weights, and the two-person override of a
quarantine (an admin requests, an independent auditor approves; bound to the checkpoint's
content: evals.overrides).

Export (`save_weights_external`) and publish are the other triggers; they live with the
SDK's routes (training, rest) and queue through evals.release as these do. Owners see
their own releases; principals that read all records (auditors, admins) see everyone's.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from audit.models import Checkpoint, ReleaseOverride, ReleaseReport, ReleaseRequest, TrainingRun
from evals import overrides, release
from gateway import downloads
from gateway.context import (
    Ctx,
    JsonBody,
    LinkCtx,
    RequestContext,
    link_digest,
    link_issuer,
    parse,
)
from gateway.errors import Forbidden, NotFound
from gateway.ownership import (
    check_not_expired,
    mine_or_all,
    owned,
    owned_checkpoint,
    page,
    reads_all,
)

router = APIRouter(prefix="/api/v1")


def release_view(row: ReleaseRequest, ckpt: Checkpoint | None) -> dict[str, Any]:
    return {"release_id": row.id, "tinker_path": row.tinker_path, "trigger": row.trigger,
            "status": row.status, "state": ckpt.release_state if ckpt else "deleted",
            "future_id": row.future_id,
            "progress": {"done": row.progress_done, "total": row.progress_total,
                         "step": row.progress_note},
            "report_id": row.report_id, "error": row.error,
            "created_at": row.created_at.isoformat(),
            "decided_at": row.decided_at.isoformat() if row.decided_at else None}


def _release(ctx: RequestContext, release_id: str) -> ReleaseRequest:
    row = ctx.session.get(ReleaseRequest, release_id)
    if row is None or not (row.principal_id == ctx.principal.id or reads_all(ctx)):
        raise NotFound(f"release {release_id} not found")
    ctx.note(subject=release_id)
    return row


class EvaluationRequest(BaseModel):
    """The checkpoint to evaluate for release."""

    model_config = ConfigDict(extra="forbid")
    tinker_path: str


@router.post("/releases", name="request_release", status_code=202)
def request_release(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    path = parse(EvaluationRequest, body).tinker_path
    ckpt = owned_checkpoint(ctx, path)
    run = owned(ctx, TrainingRun, ckpt.training_run_id, "training run")
    row = release.queue_release(ctx.session, ckpt, run, trigger="request",
                                actor=ctx.principal.id, request_id=ctx.request_id,
                                api_key_id=ctx.api_key_id, scopes=ctx.scopes)
    ctx.note(subject=path, release_id=row.id)
    ctx.after_commit.append(ctx.state.wake_worker)
    return release_view(row, ckpt)


@router.get("/releases", name="list_releases")
def list_releases(ctx: Ctx, training_run_id: str | None = None, limit: int = 20,
                  offset: int = 0) -> dict[str, Any]:
    """The caller's release evaluations (everyone's for those who read all records), newest
    first; `training_run_id` narrows them to one run's checkpoints."""
    limit, offset = page(limit, offset)
    stmt = mine_or_all(ctx, select(ReleaseRequest), ReleaseRequest)
    if training_run_id is not None:
        stmt = stmt.where(ReleaseRequest.training_run_id == training_run_id)
    rows = ctx.session.scalars(stmt.order_by(ReleaseRequest.created_at.desc(),
                                             ReleaseRequest.id).limit(limit).offset(offset))
    return {"releases": [release_view(r, ctx.session.get(Checkpoint, r.checkpoint_id))
                         for r in rows.all()]}


@router.get("/releases/{release_id}", name="get_release")
def get_release(release_id: str, ctx: Ctx) -> dict[str, Any]:
    row = _release(ctx, release_id)
    return release_view(row, ctx.session.get(Checkpoint, row.checkpoint_id))


@router.get("/releases/{release_id}/report", name="get_release_report")
def get_release_report(release_id: str, ctx: Ctx) -> Response:
    row = _release(ctx, release_id)
    report = ctx.session.get(ReleaseReport, row.report_id) if row.report_id else None
    if report is None:
        raise NotFound(f"release {release_id} has no report yet (it is {row.status})")
    ctx.note(report_sha256=report.report_sha256)
    # The stored bytes, exactly as their digest in the audit trail was computed.
    return Response(report.report, media_type="application/json",
                    headers={"X-Report-SHA256": report.report_sha256})


@router.get("/external_weights/{token}", name="download_external_weights")
def download_external_weights(token: str, ctx: LinkCtx) -> Response:
    """One file of released external weights, through a signed link (gateway.downloads).
    The link authenticates on its own, or with its owner's API key; either way everything
    that let it be issued is checked again now, as the bytes are read: the key that asked
    for it is still usable (whichever key presents it), the checkpoint exists, is
    unexpired, is still released, descends from nothing blocked and is held by no
    quarantine, and the adapter is the one the release decision was made on."""
    try:
        link = downloads.verify(ctx.state.url_signing_secret, token,
                                max_lifetime=ctx.state.settings.external_url_seconds)
        link_issuer(ctx.session, link)  # whatever key presents it: the issuer's must be usable
    except downloads.LinkError as exc:
        raise Forbidden(str(exc)) from exc
    ckpt = ctx.session.get(Checkpoint, link.checkpoint_id)
    if ckpt is None or link.principal_id != ctx.principal.id \
            or ckpt.principal_id != ctx.principal.id or ckpt.kind != "external_weights":
        raise NotFound("these external weights were not found for this API key")
    ctx.note(subject=ckpt.tinker_path, file=link.filename, link_expires=link.expires,
             link_key_id=link.key_id or None, link_sha256=link_digest(token))
    check_not_expired(ckpt)
    release.check_may_leave(ctx.session, ckpt, "downloaded")
    recipients = json.loads(ckpt.age_recipients) if ckpt.age_recipients else None
    try:
        name = downloads.plaintext_name(link.filename, recipients)
    except downloads.LinkError as exc:
        raise NotFound(str(exc)) from exc
    directory = ctx.state.settings.checkpoint_root / ckpt.storage_dir
    try:
        data = downloads.file_bytes(directory, name)
    except (downloads.LinkError, OSError) as exc:
        raise NotFound(f"{link.filename} of {ckpt.tinker_path} is not available") from exc
    plaintext_sha256 = hashlib.sha256(data).hexdigest()
    if name == downloads.PEFT_WEIGHTS and ckpt.adapter_sha256 is not None \
            and plaintext_sha256 != ckpt.adapter_sha256:
        raise Forbidden(f"the adapter of {ckpt.tinker_path} is not the one its release "
                        "decision was made on; it is not served")
    if recipients:  # never the plaintext of an export made with recipients
        data = downloads.encrypt(data, recipients)
    ctx.note(bytes=len(data), plaintext_sha256=plaintext_sha256,
             age_recipients=len(recipients or ()))
    media = "application/json" if link.filename.endswith(".json") else "application/octet-stream"
    return Response(data, media_type=media,
                    headers={"Content-Disposition": f'attachment; filename="{link.filename}"',
                             "Cache-Control": "no-store"})


# -- two-person override -------------------------------------------------------------

class OverrideRequest(BaseModel):
    """An admin's half of the two-person override: which quarantined checkpoint, and why."""

    model_config = ConfigDict(extra="forbid")
    tinker_path: str
    reason: str


class OverrideApproval(BaseModel):
    """The second person's half: why they agree."""

    model_config = ConfigDict(extra="forbid")
    reason: str


def _override_view(row: ReleaseOverride) -> dict[str, Any]:
    return {"override_id": row.id, "tinker_path": row.tinker_path, "status": row.status,
            "adapter_sha256": row.adapter_sha256,
            "requested_by": row.requested_by, "request_reason": row.request_reason,
            "approved_by": row.approved_by, "approve_reason": row.approve_reason,
            "cancel_reason": row.cancel_reason,
            "requested_at": row.requested_at.isoformat(),
            "decided_at": row.decided_at.isoformat() if row.decided_at else None}


@router.get("/admin/release_overrides", name="admin_list_overrides")
def list_overrides(ctx: Ctx, status: str | None = None) -> dict[str, Any]:
    stmt = select(ReleaseOverride).order_by(ReleaseOverride.requested_at)
    if status is not None:
        stmt = stmt.where(ReleaseOverride.status == status)
    return {"overrides": [_override_view(r) for r in ctx.session.scalars(stmt)]}


@router.post("/admin/release_overrides", name="admin_request_override", status_code=201)
def request_override(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(OverrideRequest, body)
    ckpt = owned_checkpoint(ctx, req.tinker_path, read=True)
    row = overrides.request_override(
        ctx.session, ckpt, principal_id=ctx.principal.id, key_id=ctx.api_key_id,
        reason=req.reason, checkpoint_root=ctx.state.settings.checkpoint_root,
        request_id=ctx.request_id)
    ctx.note(subject=req.tinker_path, override_id=row.id, adapter_sha256=row.adapter_sha256)
    return _override_view(row)


@router.post("/admin/release_overrides/{override_id}/approve", name="admin_approve_override")
def approve_override(override_id: str, ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(OverrideApproval, body)
    row = ctx.session.get(ReleaseOverride, override_id)
    if row is None:
        raise NotFound(f"override {override_id} not found")
    ckpt = overrides.approve_override(
        ctx.session, row, principal_id=ctx.principal.id, key_id=ctx.api_key_id,
        reason=req.reason, checkpoint_root=ctx.state.settings.checkpoint_root,
        allows=ctx.state.authorizer.allows, request_id=ctx.request_id)
    ctx.note(subject=ckpt.tinker_path, override_id=row.id)
    ctx.after_commit.append(lambda: ctx.state.checkpoints.write(f"override:{row.id}"))
    return _override_view(row)


def queued_message(row: ReleaseRequest) -> str:
    return (f"its release evaluation {row.id} is queued; follow it with GET "
            f"/api/v1/releases/{row.id}")
