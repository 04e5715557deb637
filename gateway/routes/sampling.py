"""Tinker sampling endpoints: sampling sessions (samplers) and asample."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from tinker import types as tt

from audit.db import transaction
from audit.models import Checkpoint, Sampler, TrainingRun
from engine import jobs, wire
from evals.quarantine import check_owner_may_sample
from gateway.admission import AdmissionRequest, admit, check_quota_first
from gateway.context import Ctx, JsonBody, RequestContext, parse
from gateway.errors import BadRequest, NotFound
from gateway.ownership import check_not_expired, owned, owned_checkpoint
from gateway.routes.training import base_model_info, check_new_session_child
from gateway.screening import screen_prompt
from policy.lineage import check_lineage_not_blocked
from policy.quotas import Charge

router = APIRouter(prefix="/api/v1")


@router.post("/create_sampling_session", name="create_sampling_session")
def create_sampling_session(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(tt.CreateSamplingSessionRequest, body)
    check_new_session_child(ctx, req.session_id, req.sampling_session_seq_id)
    sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
    existing = ctx.session.get(Sampler, sampler_id)
    if existing is None:
        ctx.session.add(_new_sampler(ctx, req, sampler_id))
    ctx.note(subject=sampler_id, base_model=req.base_model, model_path=req.model_path)
    return tt.CreateSamplingSessionResponse(sampling_session_id=sampler_id).model_dump(
        mode="json")


def _new_sampler(ctx: RequestContext, req: tt.CreateSamplingSessionRequest,
                 sampler_id: str) -> Sampler:
    if req.model_path:
        ckpt = owned_checkpoint(ctx, req.model_path)
        run = owned(ctx, TrainingRun, ckpt.training_run_id, "training run")
        if req.base_model and req.base_model != run.base_model:
            raise BadRequest(f"{req.model_path} was trained on {run.base_model}, "
                             f"not {req.base_model}")
        check_lineage_not_blocked(ctx.session, run, "sampled")
        check_owner_may_sample(ctx.session, ckpt, run, ctx.state.release_policy)
        return Sampler(id=sampler_id, session_id=req.session_id, principal_id=ctx.principal.id,
                       base_model=run.base_model, model_path=req.model_path,
                       checkpoint_id=ckpt.id, parent_run_id=run.id)
    if not req.base_model:
        raise BadRequest("give base_model or model_path")
    base_model_info(ctx, req.base_model)
    return Sampler(id=sampler_id, session_id=req.session_id, principal_id=ctx.principal.id,
                   base_model=req.base_model)


@router.post("/asample", name="asample")
def asample(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    sampler_id = body.get("sampling_session_id") if isinstance(body, dict) else None
    if not isinstance(sampler_id, str) or not sampler_id:
        raise BadRequest("sampling_session_id is required")
    # The prompt is screened before the request's transaction begins (see gateway.screening).
    base_model = _sampler_base_model(ctx, sampler_id)
    if base_model is None:
        raise NotFound(f"sampler {sampler_id} not found")
    info = base_model_info(ctx, base_model)
    call = wire.parse_sample_request(body, info)
    spec = call.spec
    ctx.state.settings.limits.check_sampling(spec.num_samples, spec.max_tokens)
    # Every sampler, adapters included: an adapter samples the base plus a low-rank change.
    ctx.scopes.check_topk_logprobs(spec.topk_prompt_logprobs, spec.topk_sample_logprobs)
    check_quota_first(ctx, AdmissionRequest(
        kind="sample", payload=b"", sampler_id=sampler_id, seq_id=call.seq_id,
        charge=Charge(sampled_tokens=spec.metered_tokens)))
    screen_prompt(ctx, list(spec.prompt), info.tokenizer_dir)  # after the cheap checks
    sampler = owned(ctx, Sampler, sampler_id, "sampler")
    adapter = _adapter(ctx, sampler)
    job = jobs.SampleJob(sampler_id=sampler.id, base_model=sampler.base_model,
                         adapter_dir=adapter.storage_dir if adapter else None, request=body)
    charge = Charge(sampled_tokens=spec.metered_tokens,
                    training_run_id=adapter.training_run_id if adapter else "")
    request_id = admit(ctx, AdmissionRequest(
        kind="sample", payload=jobs.dump_job(job), sampler_id=sampler.id, seq_id=call.seq_id,
        charge=charge,
        audit={"samples": spec.num_samples, "max_tokens": spec.max_tokens,
               "prompt_tokens": len(spec.prompt),
               "scored_prompt_tokens": spec.scored_prompt_tokens,
               "adapter": sampler.model_path}))
    ids = [f"{request_id}:{i}" for i in range(spec.num_samples)]
    return tt.UntypedAPIFuture(request_id=request_id, sample_sequence_ids=ids).model_dump(
        mode="json", exclude_none=True)


def _sampler_base_model(ctx: RequestContext, sampler_id: str) -> str | None:
    with transaction(ctx.state.read_factory) as session:
        sampler = session.get(Sampler, sampler_id)
        if sampler is None or sampler.principal_id != ctx.principal.id:
            return None
        return sampler.base_model


def _adapter(ctx: RequestContext, sampler: Sampler) -> Checkpoint | None:
    """The checkpoint a sampler samples through; None for the bare base model. Weights
    that descend from blocked weights (policy.lineage), and expired weights, are not
    sampled; quarantined ones only where the release policy lets their owner
    (evals.quarantine)."""
    if sampler.model_path is None:
        return None
    ckpt = ctx.session.get(Checkpoint, sampler.checkpoint_id) if sampler.checkpoint_id else None
    if ckpt is None:
        raise NotFound(f"the weights of sampler {sampler.id} ({sampler.model_path}) were deleted")
    check_not_expired(ckpt)
    run = ctx.session.get(TrainingRun, ckpt.training_run_id)
    if run is not None:
        check_lineage_not_blocked(ctx.session, run, "sampled")
    check_owner_may_sample(ctx.session, ckpt, run, ctx.state.release_policy)
    return ckpt

