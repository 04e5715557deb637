"""Tinker sampling endpoints: sampling sessions (samplers) and asample."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from tinker import types as tt

from audit.db import transaction
from audit.models import Checkpoint, Sampler, TrainingRun
from engine import jobs, wire
from gateway.admission import AdmissionRequest, admit
from gateway.context import Ctx, JsonBody, RequestContext, parse
from gateway.errors import BadRequest, NotFound
from gateway.ownership import owned, owned_checkpoint
from gateway.routes.training import base_model_info, check_new_session_child
from gateway.screening import screen_prompt
from policy.quotas import Charge
from policy.screening.tally import check_not_blocked

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
        return Sampler(id=sampler_id, session_id=req.session_id, principal_id=ctx.principal.id,
                       base_model=run.base_model, model_path=req.model_path,
                       checkpoint_id=ckpt.id)
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
    screen_prompt(ctx, list(spec.prompt), info.tokenizer_dir)
    sampler = owned(ctx, Sampler, sampler_id, "sampler")
    ctx.state.settings.limits.check_sampling(spec.num_samples, spec.max_tokens)
    adapter = _adapter(ctx, sampler)
    if adapter is None:
        ctx.scopes.check_base_topk(spec.topk_prompt_logprobs, spec.topk_sample_logprobs)
    job = jobs.SampleJob(sampler_id=sampler.id, base_model=sampler.base_model,
                         adapter_dir=adapter.storage_dir if adapter else None, request=body)
    charge = Charge(sampled_tokens=spec.num_samples * spec.max_tokens,
                    training_run_id=adapter.training_run_id if adapter else "")
    request_id = admit(ctx, AdmissionRequest(
        kind="sample", payload=jobs.dump_job(job), sampler_id=sampler.id, seq_id=call.seq_id,
        charge=charge,
        audit={"samples": spec.num_samples, "max_tokens": spec.max_tokens,
               "prompt_tokens": len(spec.prompt), "adapter": sampler.model_path}))
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
    """The checkpoint a sampler samples through; None for the bare base model. Weights of
    a run blocked by screening are not sampled."""
    if sampler.model_path is None:
        return None
    ckpt = ctx.session.get(Checkpoint, sampler.checkpoint_id) if sampler.checkpoint_id else None
    if ckpt is None:
        raise NotFound(f"the weights of sampler {sampler.id} ({sampler.model_path}) were deleted")
    run = ctx.session.get(TrainingRun, ckpt.training_run_id)
    if run is not None:
        check_not_blocked(run)
    return ckpt

