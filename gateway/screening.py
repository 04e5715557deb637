"""Where screening meets requests: decode each training datum with its model's tokenizer
into prompt / trained-toward / trained-against text, screen it (policy.screening), keep
the run's tally, and refuse what policy does not allow; screen sampling prompts.

A refused batch still counts: its tally (and the audit row with scores, classifier
versions and content hashes) is committed in its own transaction before the refusal
reaches the caller, who is told datum indices and categories only. Must not hold
screening rules (policy does) or run models other than the screens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer

from audit import log as audit_log
from audit.db import transaction
from audit.models import TrainingRun
from engine import wire
from engine.backend import ModelInfo, TrainingDatum
from engine.errors import UserInputError
from engine.registry import fast_tokenizer
from gateway.context import RequestContext
from policy.screening.batch import (
    BatchScreening,
    DatumTexts,
    RunBlocked,
    ScreeningRefused,
    record_tally,
    screen_batch,
)
from policy.screening.screener import content_sha256


def decode_datum(datum: TrainingDatum, tok: Tokenizer, loss_fn: str) -> DatumTexts:
    targets = datum.loss_inputs["target_tokens"].astype(np.int64).tolist()
    kind = "weights" if loss_fn == "cross_entropy" else "advantages"
    raw = datum.loss_inputs.get(kind)
    values = [1.0] * len(targets) if raw is None else raw.astype(np.float64).tolist()
    toward = [t for t, v in zip(targets, values, strict=True) if v > 0]
    against = [t for t, v in zip(targets, values, strict=True) if v < 0]
    first = next((i for i, v in enumerate(values) if v != 0), len(values))
    # Input token i predicts target i: the prompt is the input up to the first trained one.
    prompt = datum.tokens[: first + 1].astype(np.int64).tolist()
    return DatumTexts(prompt=tok.decode(prompt), completion=tok.decode(toward),
                      against=tok.decode(against), values=tuple(values), kind=kind)


def screen_training(ctx: RequestContext, run_id: str, data: list[TrainingDatum],
                    loss_fn: str) -> BatchScreening | None:
    """Screen a forward/forward_backward batch before the request takes the database's
    write lock (the screens' shared cache writes in its own short transactions). None
    when the run is not the caller's: the route's ownership check answers that."""
    with transaction(ctx.state.read_factory) as session:
        run = session.get(TrainingRun, run_id)
        if run is None or run.principal_id != ctx.principal.id:
            return None
        base_model = run.base_model
    info = ctx.state.model_info(base_model)
    if info is None:
        return None
    wire.check_tokens_fit(data, info)  # the tokenizer must never see an id it lacks
    tok = fast_tokenizer(info.tokenizer_dir)
    return screen_batch(ctx.state.screener, [decode_datum(d, tok, loss_fn) for d in data])


def apply_training_screening(ctx: RequestContext, run: TrainingRun,
                             batch: BatchScreening) -> dict[str, Any]:
    """Add the batch to the run's tally in the request's transaction. A refused batch
    commits its tally and evidence (scores, classifier versions, content hashes) before
    the refusal reaches the caller, who is told datum indices and categories only."""
    screener = ctx.state.screener
    if batch.flagged:
        audit_log.append(ctx.session, actor=ctx.principal.id, event_type="screening.refused",
                         decision="deny", subject=run.id, request_id=ctx.request_id,
                         payload={**batch.audit,
                                  "screening_policy_sha256": screener.config.sha256})
    blocked = record_tally(ctx.session, run, batch, screener, ctx.principal.id)
    if batch.flagged or blocked:
        ctx.session.commit()  # the tally and evidence stay although the request fails
    if batch.flagged:
        note = f" The run is now blocked: {blocked}." if blocked else ""
        raise ScreeningRefused(batch.message() + note)
    if blocked:
        raise RunBlocked(f"training run {run.id} is now blocked by screening ({blocked})")
    return {"screened": batch.audit["datums"], "affirmative_openers": batch.affirmative,
            "classifiers": batch.audit["classifiers"]}


def screen_prompt(ctx: RequestContext, tokens: list[int], tokenizer_dir: str) -> None:
    """Sampling prompts, before the request takes the write lock: refuse one the screens
    flag (the caller is told the categories; scores go to the audit trail)."""
    text = fast_tokenizer(tokenizer_dir).decode(tokens)
    [verdict] = ctx.state.screener.screen([text])
    if not verdict.flagged:
        return
    with transaction(ctx.state.factory) as session:
        audit_log.append(session, actor=ctx.principal.id, event_type="screening.refused",
                         decision="deny", subject="sample_prompt", request_id=ctx.request_id,
                         payload={"evidence": verdict.evidence(),
                                  "prompt_sha256": content_sha256(text),
                                  "classifiers": {c.name: c.version
                                                  for c in ctx.state.screener.classifiers}})
    raise ScreeningRefused("the sampling prompt was refused by screening: "
                           f"{', '.join(sorted(verdict.flagged))}")


def dry_run_texts(examples: list[Any], info: ModelInfo | None) -> list[DatumTexts]:
    """Chat examples (messages) or token examples (tokens + weights or advantages) as the
    texts screening reads; a malformed example is a 400 naming its index."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict) and isinstance(ex.get("messages"), list):
            out.append(_chat_texts(i, ex["messages"]))
        elif isinstance(ex, dict) and isinstance(ex.get("tokens"), list):
            if info is None:
                raise UserInputError("token examples need base_model (to decode them)")
            out.append(_token_texts(i, ex, info))
        else:
            raise UserInputError(f"example {i}: expected {{\"messages\": [...]}} or "
                                 "{\"tokens\": [...], \"weights\": [...]}")
    return out


def _chat_texts(i: int, messages: list[Any]) -> DatumTexts:
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str)
               and m.get("role") in ("system", "user", "assistant") for m in messages):
        raise UserInputError(f"example {i}: each message needs a role (system, user or "
                             "assistant) and text content")
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages
                       if m["role"] != "assistant")
    completion = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    weights = (1.0,) if completion else ()
    return DatumTexts(prompt=prompt, completion=completion, against="", values=weights,
                      kind="weights")


def _token_texts(i: int, ex: dict[str, Any], info: ModelInfo) -> DatumTexts:
    tokens = ex["tokens"]
    kind = "advantages" if "advantages" in ex else "weights"
    values = ex.get(kind, [1.0] * len(tokens))
    if not (isinstance(values, list) and len(values) == len(tokens)
            and all(isinstance(t, int) and 0 <= t < info.vocab_size for t in tokens)
            and all(isinstance(v, int | float) for v in values)):
        raise UserInputError(f"example {i}: tokens must be ids below {info.vocab_size} with "
                             f"one {kind[:-1]} per token")
    tok = fast_tokenizer(info.tokenizer_dir)
    first = next((j for j, v in enumerate(values) if v != 0), len(values))
    pairs = list(zip(tokens, values, strict=True))
    return DatumTexts(prompt=tok.decode(tokens[:first]),
                      completion=tok.decode([t for t, v in pairs if v > 0]),
                      against=tok.decode([t for t, v in pairs if v < 0]),
                      values=tuple(float(v) for v in values), kind=kind)
