"""Screening for researchers and admins: a dry run over a dataset before training, and
the screening policy's thresholds (read by auditors, set by admins, audited).

The dry run reports datum indices and harm categories — never scores — and touches no
run's tally, but counts in the sender's own (policy.screening.tally), judged when they
next train, so that it cannot be used to train only what passes; its tokens count against
the key's training tokens per day, checked before the screens run. Must not hold screening
rules (policy.screening does)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from engine.values import ModelInfo
from gateway.admission import AdmissionRequest, check_quota_first
from gateway.context import Ctx, JsonBody, RequestContext
from gateway.errors import BadRequest
from gateway.ownership import check_caller_not_blocked
from gateway.routes.training import base_model_info
from gateway.screening import dry_run_datums, dry_run_texts, record_dry_run
from policy import quotas
from policy.quotas import Charge
from policy.screening.batch import BatchScreening, screen_batch
from policy.screening.screener import set_threshold

router = APIRouter(prefix="/api/v1")
MAX_DRY_RUN_EXAMPLES = 10_000


@router.post("/screening/dry_run", name="screening_dry_run")
async def screening_dry_run(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """Body: {"examples": [{"messages": [{"role", "content"}, …]} | {"tokens": […],
    "weights": […]} | {"tokens": […], "advantages": […], "loss_fn"?}], "base_model"?
    (default: this gateway's first base model)}. Chat examples are rendered with the base
    model's chat template and screened exactly as the forward_backward datum a typical SFT
    renderer makes of them (assistant content trained)."""
    examples = body.get("examples")
    if not isinstance(examples, list) or not examples:
        raise BadRequest("examples must be a non-empty list")
    if len(examples) > MAX_DRY_RUN_EXAMPLES:
        raise BadRequest(f"at most {MAX_DRY_RUN_EXAMPLES} examples per dry run; split the file")
    base_model = body.get("base_model", ctx.state.settings.base_models[0])
    if not isinstance(base_model, str):
        raise BadRequest("base_model must be a model name")
    info = base_model_info(ctx, base_model)
    batch, tokens = await run_in_threadpool(_screen, ctx, examples, info)
    ctx.note(examples=len(examples), flagged=len(batch.flagged), training_tokens=tokens,
             classifiers=batch.audit["classifiers"])
    return {"examples": len(examples),
            "flagged": [{"index": i, "categories": sorted(set(c))}
                        for i, c in sorted(batch.flagged.items())],
            "affirmative_openers": batch.affirmative}


def _screen(ctx: RequestContext, examples: list[Any], info: ModelInfo
            ) -> tuple[BatchScreening, int]:
    """Screen the examples, metered as training tokens: the quota is checked before the
    screens run and charged (in the request's transaction) after."""
    check_caller_not_blocked(ctx)
    datums = dry_run_datums(examples, info)
    charge = Charge(training_tokens=sum(len(d.tokens) for _, d in datums))
    check_quota_first(ctx, AdmissionRequest(kind="screening_dry_run", payload=b"",
                                            charge=charge))
    batch = screen_batch(ctx.state.screener, dry_run_texts(datums, info))
    record_dry_run(ctx, batch)
    if ctx.api_key_id is not None:
        quotas.consume(ctx.session, ctx.api_key_id, ctx.scopes, charge)
    return batch, charge.training_tokens


@router.get("/admin/screening", name="admin_get_screening")
def admin_get_screening(ctx: Ctx) -> dict[str, Any]:
    screener = ctx.state.screener
    overrides = screener.thresholds()
    return {**screener.describe(), "thresholds": {
        key: {"threshold": screener.config.threshold(key, overrides),
              "output_threshold": screener.config.threshold(key, overrides, output=True),
              "override": key in overrides}
        for key in screener.categories()}}


@router.put("/admin/screening/thresholds/{category}", name="admin_set_screening_threshold")
def admin_set_screening_threshold(category: str, ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """Body: {"threshold": number} to override, {"threshold": null} to return to policy."""
    value = body.get("threshold", "missing")
    if value == "missing" or not (value is None or isinstance(value, int | float)):
        raise BadRequest('send {"threshold": <number>} or {"threshold": null} to reset')
    screener = ctx.state.screener
    set_threshold(ctx.session, actor=ctx.principal.id, category=category,
                  value=None if value is None else float(value), config=screener.config,
                  known=screener.categories())
    ctx.note(subject=category, threshold=value)
    return {"category": category, "threshold": value}
