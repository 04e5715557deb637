"""Owner-scoped REST (the SDK's RestClient): training runs, checkpoints, sessions,
samplers. A principal sees only its own objects, anything else is a 404 — except that
principals the policy lets read all records (auditors, admins) see everyone's in the
read routes. Changes (delete, publish, TTL) are always owner-only. Checkpoints past their
TTL are not listed (gateway.ownership)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from sqlalchemy import func, select
from tinker import types as tt

from audit.db import transaction
from audit.models import Checkpoint, ClientSession, Principal, Sampler, TrainingRun, as_utc
from evals import overrides, release
from gateway import downloads
from gateway.context import Ctx, JsonBody, RequestContext, load_json_text
from gateway.errors import BadRequest, Forbidden, NotFound
from gateway.ownership import mine_or_all, owned, owned_checkpoint, page, tinker_path, unexpired
from gateway.routes.release import queued_message

router = APIRouter(prefix="/api/v1")

CheckpointType = Literal["training", "sampler", "external"]
CHECKPOINT_TYPES: dict[str, CheckpointType] = {
    "weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def checkpoint_view(ckpt: Checkpoint) -> tt.Checkpoint:
    return tt.Checkpoint(
        checkpoint_id=f"{ckpt.kind}/{ckpt.name}", checkpoint_type=CHECKPOINT_TYPES[ckpt.kind],
        time=as_utc(ckpt.created_at), tinker_path=ckpt.tinker_path, size_bytes=ckpt.size_bytes,
        public=ckpt.public, user_metadata=load_json_text(ckpt.user_metadata) or None,
        expires_at=as_utc(ckpt.expires_at) if ckpt.expires_at else None)


def _latest(ctx: RequestContext, run_id: str, kind: str) -> tt.Checkpoint | None:
    ckpt = ctx.session.scalars(
        select(Checkpoint).where(Checkpoint.training_run_id == run_id, Checkpoint.kind == kind,
                                 unexpired())
        .order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc()).limit(1)).first()
    return checkpoint_view(ckpt) if ckpt else None


def _owner_name(ctx: RequestContext, principal_id: str) -> str:
    if principal_id == ctx.principal.id:
        return ctx.principal.name
    owner = ctx.session.get(Principal, principal_id)
    return owner.name if owner else principal_id


def run_view(ctx: RequestContext, run: TrainingRun) -> tt.TrainingRun:
    return tt.TrainingRun(
        training_run_id=run.id, base_model=run.base_model,
        model_owner=_owner_name(ctx, run.principal_id),
        is_lora=True, corrupted=run.status == "failed", lora_rank=run.lora_rank,
        last_request_time=as_utc(run.last_request_time),
        last_checkpoint=_latest(ctx, run.id, "weights"),
        last_sampler_checkpoint=_latest(ctx, run.id, "sampler_weights"),
        user_metadata=load_json_text(run.user_metadata) or None)


@router.get("/training_runs", name="list_training_runs")
def list_training_runs(ctx: Ctx, limit: int = 20, offset: int = 0) -> dict:
    limit, offset = page(limit, offset)
    mine = mine_or_all(ctx, select(TrainingRun), TrainingRun)
    total = ctx.session.scalar(select(func.count()).select_from(mine.subquery())) or 0
    runs = ctx.session.scalars(mine.order_by(TrainingRun.created_at.desc())
                               .limit(limit).offset(offset)).all()
    return tt.TrainingRunsResponse(
        training_runs=[run_view(ctx, r) for r in runs],
        cursor=tt.Cursor(offset=offset, limit=limit, total_count=total),
    ).model_dump(mode="json")


@router.get("/training_runs/{run_id}", name="get_training_run")
def get_training_run(run_id: str, ctx: Ctx) -> dict[str, Any]:
    ctx.note(subject=run_id)
    run = owned(ctx, TrainingRun, run_id, "training run", read=True)
    return run_view(ctx, run).model_dump(mode="json")


@router.get("/training_runs/{run_id}/checkpoints", name="list_run_checkpoints")
def list_run_checkpoints(run_id: str, ctx: Ctx) -> dict[str, Any]:
    owned(ctx, TrainingRun, run_id, "training run", read=True)
    rows = ctx.session.scalars(select(Checkpoint).where(Checkpoint.training_run_id == run_id,
                                                        unexpired())
                               .order_by(Checkpoint.created_at, Checkpoint.id)).all()
    return tt.CheckpointsListResponse(checkpoints=[checkpoint_view(c) for c in rows]).model_dump(
        mode="json")


@router.get("/checkpoints", name="list_user_checkpoints")
def list_user_checkpoints(ctx: Ctx, limit: int = 100, offset: int = 0) -> dict:
    limit, offset = page(limit, offset)
    mine = mine_or_all(ctx, select(Checkpoint).where(unexpired()), Checkpoint)
    total = ctx.session.scalar(select(func.count()).select_from(mine.subquery())) or 0
    rows = ctx.session.scalars(mine.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc())
                               .limit(limit).offset(offset)).all()
    return tt.CheckpointsListResponse(
        checkpoints=[checkpoint_view(c) for c in rows],
        cursor=tt.Cursor(offset=offset, limit=limit, total_count=total),
    ).model_dump(mode="json")


@router.post("/weights_info", name="weights_info")
def weights_info(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    path = body.get("tinker_path") if isinstance(body, dict) else None
    if not isinstance(path, str):
        raise BadRequest("tinker_path is required")
    ckpt = owned_checkpoint(ctx, path, read=True)
    run = owned(ctx, TrainingRun, ckpt.training_run_id, "training run", read=True)
    lora = json.loads(run.lora_config)
    ctx.note(subject=path)
    return tt.WeightsInfoResponse(
        base_model=run.base_model, is_lora=True, lora_rank=run.lora_rank,
        train_unembed=lora.get("train_unembed"), train_mlp=lora.get("train_mlp"),
        train_attn=lora.get("train_attn"),
    ).model_dump(mode="json", exclude_none=True)


def _run_checkpoint(ctx: RequestContext, run_id: str, checkpoint_id: str) -> Checkpoint:
    owned(ctx, TrainingRun, run_id, "training run")
    ctx.note(subject=f"{run_id}/{checkpoint_id}")
    return owned_checkpoint(ctx, tinker_path(run_id, *_split_checkpoint_id(checkpoint_id)))


def _split_checkpoint_id(checkpoint_id: str) -> tuple[str, str]:
    kind, _, name = checkpoint_id.partition("/")
    if kind not in CHECKPOINT_TYPES or not name or "/" in name:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    return kind, name


@router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish",
             name="publish_checkpoint")
def publish_checkpoint(run_id: str, checkpoint_id: str, ctx: Ctx) -> Response:
    """Publishing is a release trigger: a private checkpoint gets its evaluation queued (and
    is published if released); the call itself fails until the checkpoint is released."""
    ckpt = _run_checkpoint(ctx, run_id, checkpoint_id)
    if ckpt.release_state in ("private", "evaluating"):
        path, queued = ckpt.tinker_path, _queue_publication(ctx, ckpt.id)
        raise Forbidden(f"{path} is not released yet, so it cannot be published: {queued}. "
                        "It is published automatically if the evaluation releases it")
    release.check_may_leave(ctx.session, ckpt, "published")
    ckpt.public = True
    return Response(status_code=204)


def _queue_publication(ctx: RequestContext, checkpoint_id: int) -> str:
    """Queue the checkpoint's evaluation, to publish it if released, in a transaction of
    its own: the call that asks is refused, and its own transaction rolls back, but the
    queued evaluation stays. The request's transaction is rolled back first (on SQLite it
    holds the write lock)."""
    ctx.session.rollback()
    with transaction(ctx.state.factory) as session:
        ckpt = session.get(Checkpoint, checkpoint_id)
        run = session.get(TrainingRun, ckpt.training_run_id) if ckpt is not None else None
        if ckpt is None or run is None:
            raise NotFound("the checkpoint was deleted meanwhile")
        row = release.queue_release(session, ckpt, run, trigger="publish",
                                    actor=ctx.principal.id, request_id=ctx.request_id,
                                    api_key_id=ctx.api_key_id, scopes=ctx.scopes)
        ckpt.publish_on_release = True
        message = queued_message(row)
    ctx.state.wake_worker()
    return message


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish",
               name="unpublish_checkpoint")
def unpublish_checkpoint(run_id: str, checkpoint_id: str, ctx: Ctx) -> Response:
    _run_checkpoint(ctx, run_id, checkpoint_id).public = False
    return Response(status_code=204)


@router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl",
            name="set_checkpoint_ttl")
def set_checkpoint_ttl(run_id: str, checkpoint_id: str, ctx: Ctx,
                       body: JsonBody) -> Response:
    ckpt = _run_checkpoint(ctx, run_id, checkpoint_id)
    ttl = body.get("ttl_seconds") if isinstance(body, dict) else None
    if ttl is not None and (not isinstance(ttl, int) or ttl <= 0):
        raise BadRequest("ttl_seconds must be a positive integer or null")
    ckpt.expires_at = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=ttl)) if ttl else None
    ctx.note(ttl_seconds=ttl)
    return Response(status_code=204)


@router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls",
            name="external_weights_urls")
def external_weights_urls(run_id: str, checkpoint_id: str, ctx: Ctx,
                          request: Request) -> dict[str, Any]:
    """Signed, short-lived links to the released adapter's PEFT files (owner only): each
    names this checkpoint, one file, the caller and the key asking, and authenticates a
    plain GET on its own (gateway.downloads). An export made with age recipients lists its
    files as `<file>.age`."""
    ckpt = _run_checkpoint(ctx, run_id, checkpoint_id)
    if ckpt.kind != "external_weights":
        raise BadRequest(f"{ckpt.tinker_path} is not external weights; export the adapter "
                         "with save_weights_external and ask for that path's URLs")
    release.check_may_leave(ctx.session, ckpt, "downloaded")
    settings = ctx.state.settings
    expires = int(time.time()) + settings.external_url_seconds
    secret = ctx.state.url_signing_secret
    base = str(request.base_url).rstrip("/")
    recipients = json.loads(ckpt.age_recipients) if ckpt.age_recipients else None
    urls = {name: base + str(request.app.url_path_for(
        "download_external_weights", token=downloads.sign(
            secret, downloads.Link(ckpt.id, ctx.principal.id, name, expires,
                                   ctx.api_key_id or ""))))
        for name in downloads.served_files(recipients)}
    ctx.note(expires=expires, files=list(urls))
    return tt.ExternalWeightsUrlsResponse(
        urls=urls, expires=dt.datetime.fromtimestamp(expires, dt.UTC)).model_dump(mode="json")


@router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}",
               name="delete_checkpoint")
def delete_checkpoint(run_id: str, checkpoint_id: str, ctx: Ctx) -> Response:
    ckpt = _run_checkpoint(ctx, run_id, checkpoint_id)
    directory = ctx.state.settings.checkpoint_root / ckpt.storage_dir
    # An override binds to these weights: it must not outlive them (audited).
    cancelled = overrides.cancel_pending(ctx.session, ckpt, actor=ctx.principal.id,
                                         reason="the checkpoint was deleted",
                                         request_id=ctx.request_id)
    if cancelled:
        ctx.note(cancelled_overrides=cancelled)
    ctx.session.delete(ckpt)
    # Files go only once the row is gone for good.
    ctx.after_commit.append(lambda: shutil.rmtree(directory, ignore_errors=True))
    return Response(status_code=204)


@router.get("/sessions", name="list_sessions")
def list_sessions(ctx: Ctx, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    limit, offset = page(limit, offset)
    ids = ctx.session.scalars(
        mine_or_all(ctx, select(ClientSession.id), ClientSession)
        .order_by(ClientSession.created_at.desc()).limit(limit).offset(offset)).all()
    return tt.ListSessionsResponse(sessions=list(ids)).model_dump(mode="json")


@router.get("/sessions/{session_id}", name="get_session")
def get_session(session_id: str, ctx: Ctx) -> dict[str, Any]:
    session = owned(ctx, ClientSession, session_id, "session", read=True)
    runs = ctx.session.scalars(select(TrainingRun.id).where(
        TrainingRun.session_id == session_id).order_by(TrainingRun.model_seq_id)).all()
    samplers = ctx.session.scalars(select(Sampler.id).where(
        Sampler.session_id == session_id).order_by(Sampler.created_at)).all()
    ctx.note(subject=session_id)
    return tt.GetSessionResponse(
        training_run_ids=list(runs), sampler_ids=list(samplers),
        user_metadata=load_json_text(session.user_metadata) or None,
        display_name=session.display_name,
    ).model_dump(mode="json")


@router.get("/samplers/{sampler_id}", name="get_sampler")
def get_sampler(sampler_id: str, ctx: Ctx) -> dict[str, Any]:
    sampler = owned(ctx, Sampler, sampler_id, "sampler", read=True)
    ctx.note(subject=sampler_id)
    return tt.GetSamplerResponse(sampler_id=sampler.id, base_model=sampler.base_model,
                                 model_path=sampler.model_path).model_dump(
        mode="json", exclude_none=True)
