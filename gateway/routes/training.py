"""Tinker training endpoints. Each validates the request completely, checks ownership and
limits, then queues it through `admit`; the worker runs it in seq_id order. Work on an
existing run needs the run's session open (gateway.ownership) and the run to hold a slot
of its person's concurrent_training_runs (`Charge.uses_run`, policy.quotas). Loading a
checkpoint records the lineage (policy.lineage): blocks, the screening tally and
quarantines follow the weights into the loading run."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from tinker import types as tt

from audit.db import transaction
from audit.models import Checkpoint, ClientSession, TrainingRun
from engine import jobs, wire
from engine.values import AdamStep, LoraSpec, ModelInfo, check_data_fits
from evals import release
from gateway import downloads
from gateway.admission import AdmissionRequest, admit, check_quota_first
from gateway.bodies import read_body
from gateway.context import Ctx, JsonBody, RequestContext, parse
from gateway.errors import BadRequest, NotFound
from gateway.ownership import (
    check_caller_not_blocked,
    owned,
    owned_checkpoint,
    owned_run,
    storage_dir,
    tinker_path,
)
from gateway.runs import add_training_run
from gateway.screening import apply_training_screening, screen_training
from policy import lineage
from policy.limits import check_checkpoint_name
from policy.quotas import Charge
from policy.screening.tally import RunBlocked

router = APIRouter(prefix="/api/v1")


def _future(request_id: str, model_id: str | None = None) -> dict[str, Any]:
    return tt.UntypedAPIFuture(request_id=request_id, model_id=model_id).model_dump(
        mode="json", exclude_none=True)


def base_model_info(ctx: RequestContext, name: str) -> ModelInfo:
    """A served base model that the caller's key may use."""
    info = ctx.state.model_info(name)
    if info is None:
        served = ", ".join(sorted(ctx.state.models))
        raise BadRequest(f"unknown base model {name!r}; this server offers: {served}")
    ctx.scopes.check_base_model(name)
    return info


def _caller_run_model(ctx: RequestContext, run_id: str) -> ModelInfo:
    """The base model of the caller's run, read outside the request's transaction (a
    404 for anyone else's run, as the ownership check under the transaction answers)."""
    with transaction(ctx.state.read_factory) as session:
        run = session.get(TrainingRun, run_id)
        if run is None or run.principal_id != ctx.principal.id:
            raise NotFound(f"training run {run_id} not found")
        base_model = run.base_model
    return base_model_info(ctx, base_model)


def _model_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def check_new_session_child(ctx: RequestContext, session_id: str, seq: int) -> str:
    """A new run or sampler in `session_id`: the session must be the caller's and open.
    Returns the training-run id the pair (session, seq) maps to."""
    session = owned(ctx, ClientSession, session_id, "session")
    if session.finished_at is not None:
        raise BadRequest(f"session {session_id} is finished; start a new ServiceClient")
    if seq < 0:
        raise BadRequest("sequence numbers must be >= 0")
    return _model_id(session_id, seq)


@router.post("/create_model", name="create_model")
def create_model(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.CreateModelRequest, body)
    model_id = check_new_session_child(ctx, req.session_id, req.model_seq_id)
    check_caller_not_blocked(ctx)
    base_model_info(ctx, req.base_model)
    if req.lora_config is None:
        raise BadRequest("lora_config is required: only LoRA training is offered")
    if getattr(req.optimizer_config, "type", "adamw") != "adamw":
        raise BadRequest("only the adamw optimizer is offered")
    lora = LoraSpec(rank=req.lora_config.rank, seed=req.lora_config.seed,
                    train_mlp=req.lora_config.train_mlp, train_attn=req.lora_config.train_attn,
                    train_unembed=req.lora_config.train_unembed)
    ctx.state.settings.limits.check_rank(lora.rank)
    ctx.scopes.check_rank(lora.rank)
    add_training_run(ctx.session, run_id=model_id, session_id=req.session_id,
                     model_seq_id=req.model_seq_id, principal_id=ctx.principal.id,
                     api_key_id=ctx.api_key_id, base_model=req.base_model,
                     lora_rank=lora.rank, lora_config=json.dumps(lora.to_dict()),
                     user_metadata=req.user_metadata)
    job = jobs.CreateAdapterJob(model_id=model_id, base_model=req.base_model, lora=lora)
    request_id = admit(ctx, AdmissionRequest(
        kind="create_model", payload=jobs.dump_job(job), model_id=model_id, seq_id=0,
        charge=Charge(new_run=model_id, training_run_id=model_id),
        audit={"base_model": req.base_model, "lora": lora.to_dict()}))
    return _future(request_id, model_id)


@router.post("/get_info", name="get_info")
def get_info(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.GetInfoRequest, body)
    run = owned(ctx, TrainingRun, req.model_id, "training run")
    info = base_model_info(ctx, run.base_model)
    ctx.note(subject=run.id)
    return tt.GetInfoResponse(
        model_id=run.id, is_lora=True, lora_rank=run.lora_rank, model_name=run.base_model,
        model_data=tt.ModelData(arch=info.arch, model_name=run.base_model,
                                tokenizer_id=info.tokenizer_dir),
    ).model_dump(mode="json", exclude_none=True)


@router.post("/forward_backward", name="forward_backward")
async def forward_backward(request: Request, ctx: Ctx) -> dict[str, Any]:
    raw = await read_body(request)  # after ctx: authenticated first, then bounded
    return await run_in_threadpool(_admit_forward_backward, ctx, raw,
                                   request.headers.get("content-encoding"))


def _admit_forward_backward(ctx: RequestContext, raw: bytes, encoding: str | None) -> dict:
    """Cheap checks first (sizes, limits, scopes, the quota), then screening, then the
    ownership and tally under the request's transaction, then admission."""
    body = wire.decompress_body(raw, encoding, ctx.state.settings.max_decompressed_bytes)
    call = wire.decode_forward_backward(body)
    tokens = int(sum(len(d.tokens) for d in call.data))
    ctx.state.settings.limits.check_batch(len(call.data), tokens)
    ctx.scopes.check_loss(call.loss_fn)
    kind = "forward" if call.forward_only else "forward_backward"
    admission = AdmissionRequest(
        kind="forward_backward", payload=body, request_format="proto", model_id=call.model_id,
        seq_id=call.seq_id, charge=Charge(training_tokens=tokens, uses_run=call.model_id,
                                          training_run_id=call.model_id),
        audit={"op": kind, "loss_fn": call.loss_fn, "datums": len(call.data), "tokens": tokens,
               "loss_config": call.loss_config})
    check_quota_first(ctx, admission)
    info = _caller_run_model(ctx, call.model_id)
    check_data_fits(call.data, info)  # the tokenizer must never see an id it lacks
    # Screened before the request's transaction begins: the screens' cache writes on its own.
    batch = screen_training(ctx, info, call.data, call.loss_fn, call.loss_config)
    run = owned_run(ctx, call.model_id)
    ctx.note(screening=apply_training_screening(ctx, run, batch))
    return _future(admit(ctx, admission), run.id)


@router.post("/optim_step", name="optim_step")
def optim_step(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.OptimStepRequest, body)
    run = owned_run(ctx, req.model_id)
    params = req.optim_params
    if not isinstance(params, tt.AdamParams):
        raise BadRequest("only Adam parameters (adam_params) are accepted")
    step = AdamStep(learning_rate=params.learning_rate, beta1=params.beta1, beta2=params.beta2,
                    eps=params.eps, weight_decay=params.weight_decay,
                    grad_clip_norm=params.grad_clip_norm)
    ctx.state.settings.limits.check_learning_rate(step.learning_rate)
    request_id = admit(ctx, AdmissionRequest(
        kind="optim_step", payload=jobs.dump_job(jobs.OptimStepJob(model_id=run.id, step=step)),
        model_id=run.id, seq_id=req.seq_id, charge=Charge(uses_run=run.id, training_run_id=run.id),
        audit={"adam": step.__dict__}))
    return _future(request_id, run.id)


def _save_job(ctx: RequestContext, run: TrainingRun, kind: str, name: str, *,
              with_optimizer: bool, overwrite: bool, ttl: int | None,
              metadata: dict[str, str] | None,
              sampler_id: str | None = None) -> tuple[jobs.SaveAdapterJob, Charge]:
    """The save job, and its charge: a new checkpoint takes a checkpoint slot, an overwrite
    does not; either needs the run to hold its run slot."""
    check_checkpoint_name(name)
    path = tinker_path(run.id, kind, name)
    existing = ctx.session.query(Checkpoint).filter_by(tinker_path=path).first()
    exists = existing is not None
    if existing is not None and not overwrite:
        raise BadRequest(f"checkpoint {path} already exists; choose another name")
    if existing is not None and existing.release_state != "private":
        raise BadRequest(f"checkpoint {path} is {existing.release_state}: a release decision "
                         "is bound to its content, so it cannot be overwritten; save under "
                         "another name")
    if ttl is not None and ttl <= 0:
        raise BadRequest("ttl_seconds must be positive")
    charge = Charge(checkpoint=not exists, uses_run=run.id, training_run_id=run.id)
    return jobs.SaveAdapterJob(
        model_id=run.id, kind=kind, name=name, tinker_path=path,
        storage_dir=storage_dir(run.id, kind, name), with_optimizer=with_optimizer,
        ttl_seconds=ttl, user_metadata=dict(metadata or {}), sampler_id=sampler_id,
        session_id=run.session_id if sampler_id else None), charge


@router.post("/save_weights", name="save_weights")
def save_weights(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.SaveWeightsRequest, body)
    run = owned_run(ctx, req.model_id)
    if not req.path:
        raise BadRequest("path (the checkpoint name) is required")
    job, charge = _save_job(ctx, run, "weights", req.path, with_optimizer=True,
                            overwrite=req.overwrite, ttl=req.ttl_seconds,
                            metadata=req.user_metadata)
    request_id = admit(ctx, AdmissionRequest(
        kind="save_weights", payload=jobs.dump_job(job), model_id=run.id, seq_id=req.seq_id,
        charge=charge, audit={"path": job.tinker_path}))
    return _future(request_id, run.id)


@router.post("/save_weights_for_sampler", name="save_weights_for_sampler")
def save_weights_for_sampler(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.SaveWeightsForSamplerRequest, body)
    if req.kind != "snapshot":
        # Every sampler here serves one checkpoint, screened and bound to its lineage and
        # release state; mutable weights shared across samplers are not offered.
        raise BadRequest(f"save_weights_for_sampler kind={req.kind!r} is not supported by "
                         "this server; use kind='snapshot' (the default) and call "
                         "save_weights_and_get_sampling_client again after training to "
                         "sample newer weights")
    run = owned_run(ctx, req.model_id)
    if req.path:
        job, charge = _save_job(ctx, run, "sampler_weights", req.path, with_optimizer=False,
                                overwrite=False, ttl=req.ttl_seconds,
                                metadata=req.user_metadata)
    elif req.sampling_session_seq_id is not None:
        n = req.sampling_session_seq_id
        # The unnamed snapshot behind save_weights_and_get_sampling_client.
        job, charge = _save_job(ctx, run, "sampler_weights", f"snapshot-{n}",
                                with_optimizer=False, overwrite=False, ttl=req.ttl_seconds,
                                metadata=req.user_metadata,
                                sampler_id=f"{run.session_id}:sample:{n}")
    else:
        raise BadRequest("give either path (a name) or sampling_session_seq_id")
    request_id = admit(ctx, AdmissionRequest(
        kind="save_weights_for_sampler", payload=jobs.dump_job(job), model_id=run.id,
        seq_id=req.seq_id, charge=charge,
        audit={"path": job.tinker_path, "sampler": job.sampler_id}))
    return _future(request_id, run.id)


@router.post("/load_weights", name="load_weights")
def load_weights(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.LoadWeightsRequest, body)
    ckpt = owned_checkpoint(ctx, req.path)
    if ckpt.kind == "external_weights":
        raise BadRequest("external weights cannot be loaded for training; use a weights path")
    if req.optimizer and not ckpt.has_optimizer:
        raise BadRequest(f"{req.path} holds no optimizer state; load it without the optimizer")
    source = owned(ctx, TrainingRun, ckpt.training_run_id, "training run")
    if req.model_id:
        return _load_into_run(ctx, req, ckpt, source)
    if req.session_id is None or req.model_seq_id is None:
        raise BadRequest("give model_id, or session_id and model_seq_id")
    model_id = check_new_session_child(ctx, req.session_id, req.model_seq_id)
    check_caller_not_blocked(ctx)
    if req.base_model and req.base_model != source.base_model:
        raise BadRequest(f"{req.path} was trained on {source.base_model}, not {req.base_model}")
    base_model_info(ctx, source.base_model)
    ctx.scopes.check_rank(source.lora_rank)
    run = add_training_run(ctx.session, run_id=model_id, session_id=req.session_id,
                           model_seq_id=req.model_seq_id, principal_id=ctx.principal.id,
                           api_key_id=ctx.api_key_id, base_model=source.base_model,
                           lora_rank=source.lora_rank, lora_config=source.lora_config,
                           user_metadata=req.user_metadata)
    _inherit(ctx, run, ckpt, source)
    job = jobs.LoadAdapterJob(model_id=model_id, base_model=source.base_model,
                              source_path=req.path, storage_dir=ckpt.storage_dir,
                              with_optimizer=req.optimizer, creates_run=True)
    request_id = admit(ctx, AdmissionRequest(
        kind="load_weights_new", payload=jobs.dump_job(job), model_id=model_id, seq_id=0,
        charge=Charge(new_run=model_id, training_run_id=model_id),
        audit={"source": req.path, "optimizer": req.optimizer}))
    return _future(request_id, model_id)


def _load_into_run(ctx: RequestContext, req: tt.LoadWeightsRequest, ckpt: Checkpoint,
                   source: TrainingRun) -> dict[str, Any]:
    run = owned_run(ctx, req.model_id or "")
    if run.base_model != source.base_model:
        raise BadRequest(f"{req.path} was trained on {source.base_model}, "
                         f"but {run.id} uses {run.base_model}")
    _inherit(ctx, run, ckpt, source)
    job = jobs.LoadAdapterJob(model_id=run.id, base_model=run.base_model, source_path=req.path,
                              storage_dir=ckpt.storage_dir, with_optimizer=req.optimizer,
                              creates_run=False)
    request_id = admit(ctx, AdmissionRequest(
        kind="load_weights", payload=jobs.dump_job(job), model_id=run.id, seq_id=req.seq_id,
        charge=Charge(uses_run=run.id, training_run_id=run.id),
        audit={"source": req.path, "optimizer": req.optimizer}))
    return _future(request_id, run.id)


def _inherit(ctx: RequestContext, child: TrainingRun, ckpt: Checkpoint,
             source: TrainingRun) -> None:
    """The loading run descends from the checkpoint: refuse blocked weights, record the
    lineage and take in the source's tally; refuse a load that would block the run."""
    block = lineage.record_load(ctx.session, child=child, source=ckpt, source_run=source,
                                config=ctx.state.screener.config, actor=ctx.principal.id,
                                request_id=ctx.request_id)
    if block is not None:
        raise RunBlocked(f"loading {ckpt.tinker_path} into training run {child.id} is refused: "
                         f"with the screening tally of the weights it descends from, the run "
                         f"would be blocked ({block.reason})")
    ctx.note(lineage={"parent_run": source.id, "parent_checkpoint_id": ckpt.id})


@router.post("/save_weights_external", name="save_weights_external")
def save_weights_external(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """Export: the adapter is saved as external weights and evaluated by the release gate;
    the future resolves only once the gate has decided (released: the path; quarantined:
    a user error naming the failed suite and metric)."""
    req = parse(tt.SaveWeightsExternalRequest, body)
    run = owned_run(ctx, req.model_id)  # a run blocked by screening is refused here
    release.check_releasable(ctx.session, run)  # so is one a standing quarantine holds
    if not req.path:
        raise BadRequest("path (the name of the exported weights) is required")
    recipients = req.age_encryption_recipients
    if recipients is not None:
        try:  # validated here, at the edge: downloads encrypt to exactly these
            downloads.parse_recipients(recipients)
        except downloads.RecipientError as exc:
            raise BadRequest(str(exc)) from exc
    job, charge = _save_job(ctx, run, "external_weights", req.path, with_optimizer=False,
                            overwrite=False, ttl=req.ttl_seconds, metadata=None)
    job.age_recipients = list(recipients) if recipients else None
    request_id = admit(ctx, AdmissionRequest(
        kind="save_weights_external", payload=jobs.dump_job(job), model_id=run.id,
        seq_id=req.seq_id, charge=dataclasses.replace(charge, release_evaluation=True),
        audit={"path": job.tinker_path, "release": True,
               "age_recipients": len(job.age_recipients or ())}))
    return _future(request_id, run.id)
