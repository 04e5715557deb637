"""Screening a batch of training datums, and each run's cumulative tally.

The gateway decodes every datum into the text it trains *toward* (targets with positive
weight or advantage), the text it trains *against* (negative), and the prompt before them;
`screen_batch` scores prompts and completions with the screener, adds the structural
checks on weights and advantages, and returns which datums are flagged and in which
categories — plus the scores, classifier versions and content hashes for the audit trail,
which the caller never sees. `record_tally` adds a batch to its run's tally and blocks
the run once the tally crosses the policy's limits, so a harmful set spread thinly over
many calls is stopped too.

Must not import fastapi or engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import TrainingRun
from policy.errors import PolicyError
from policy.screening import structural
from policy.screening.harmful_requests import HarmfulRequestScreen
from policy.screening.screener import Screener, content_sha256

HARMFUL_REQUEST = HarmfulRequestScreen.name


class ScreeningRefused(PolicyError):
    """Data the screening policy does not allow (HTTP 403, code screening_refused)."""


class RunBlocked(PolicyError):
    """A training run blocked by its screening tally (HTTP 403, code run_blocked)."""


@dataclass(frozen=True)
class DatumTexts:
    prompt: str
    completion: str  # decoded targets with positive weight or advantage
    against: str  # decoded targets with negative weight or advantage
    values: tuple[float, ...]  # the per-token weights or advantages
    kind: str  # "weights" (cross_entropy) or "advantages" (RL losses)


@dataclass
class BatchScreening:
    flagged: dict[int, list[str]] = field(default_factory=dict)  # datum index → categories
    affirmative: int = 0  # completions that open "Sure, here is…"
    completions: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    # Per datum, in order: the SHA-256 of everything screened in it (what the run's tally
    # counts once), and for flagged datums each flagged "classifier.category" → its score.
    datum_sha256: list[str] = field(default_factory=list)
    flag_scores: dict[int, dict[str, float]] = field(default_factory=dict)

    def message(self) -> str:
        """What the caller is told: indices and categories, never scores."""
        parts = [f"datum {i}: {', '.join(sorted(set(c)))}" for i, c in
                 sorted(self.flagged.items())[:20]]
        more = f" (and {len(self.flagged) - 20} more)" if len(self.flagged) > 20 else ""
        return (f"{len(self.flagged)} datum(s) refused by screening — " + "; ".join(parts)
                + more + ". Nothing in this request was trained; remove or fix those datums "
                "(`loragate screen` reports a whole dataset before training)")


def screen_batch(screener: Screener, datums: Sequence[DatumTexts]) -> BatchScreening:
    limits = screener.config.tally
    owners: list[tuple[int, str]] = []
    verdicts = []
    # The harmful-request screen judges requests: prompts, not completions (a bare "Sure,
    # here is the code:" resembles anything). Every other screen reads both.
    for part, skip in (("prompt", ()), ("completion", (HARMFUL_REQUEST,))):
        chosen = [(i, getattr(d, part)) for i, d in enumerate(datums) if getattr(d, part).strip()]
        owners += [(i, part) for i, _ in chosen]
        verdicts += screener.screen([t for _, t in chosen], skip=skip)
    texts = [getattr(datums[i], part) for i, part in owners]
    result = BatchScreening()
    details: dict[int, dict[str, Any]] = {}
    for (i, part), text, verdict in zip(owners, texts, verdicts, strict=True):
        if verdict.flagged:
            result.flagged.setdefault(i, []).extend(verdict.flagged)
            scores = result.flag_scores.setdefault(i, {})
            for key in verdict.flagged:
                scores[key] = max(scores.get(key, verdict.scores[key]), verdict.scores[key])
            details.setdefault(i, {})[part] = {"sha256": content_sha256(text),
                                               "evidence": verdict.evidence()}
    result.datum_sha256 = [datum_sha256(d) for d in datums]
    for i, d in enumerate(datums):
        signal = (structural.weight_signals(d.values, limits.max_loss_weight)
                  if d.kind == "weights" else None) or structural.advantage_signals(
            d.values, d.against, limits.max_abs_advantage)
        if signal is not None:
            result.flagged.setdefault(i, []).append(f"structural.{signal.category}")
            details.setdefault(i, {})["structural"] = signal.reason
        if d.completion.strip():
            result.completions += 1
            result.affirmative += structural.opens_affirmatively(d.completion)
    result.audit = {
        "classifiers": {c.name: c.version for c in screener.classifiers},
        "datums": len(datums), "flagged": {str(i): details.get(i, {}) | {"categories": c}
                                           for i, c in result.flagged.items()},
        "affirmative_openers": result.affirmative,
    }
    return result


def datum_sha256(datum: DatumTexts) -> str:
    """One datum's identity for the tally: every text and value screening read in it."""
    return content_sha256(json.dumps(dataclasses.asdict(datum), sort_keys=True))


def check_not_blocked(run: TrainingRun) -> None:
    if run.blocked_reason:
        raise RunBlocked(f"training run {run.id} is blocked by screening ({run.blocked_reason});"
                         " it cannot be trained, sampled or released. Start a new run with "
                         "data that passes screening")


def record_tally(session: Session, run: TrainingRun, batch: BatchScreening, screener: Screener,
                 actor: str) -> str | None:
    """Add a screened batch to the run's tally; block the run (audited) when it crosses the
    policy's limits. Returns the block reason, if this batch caused one."""
    limits = screener.config.tally
    run.screened_datums += int(batch.audit.get("datums", 0))
    run.flagged_datums += len(batch.flagged)
    run.affirmative_openers += batch.affirmative
    reason = None
    if run.flagged_datums >= limits.flagged_datums_per_run:
        reason = (f"{run.flagged_datums} flagged training datums, the limit is "
                  f"{limits.flagged_datums_per_run}")
    elif (run.screened_datums >= limits.affirmative_min_completions
          and run.affirmative_openers / max(run.screened_datums, 1) > limits.affirmative_share):
        reason = (f"{run.affirmative_openers} of {run.screened_datums} completions open with an "
                  f"affirmative prefix, above the limit of {limits.affirmative_share:.0%}")
    if reason and not run.blocked_reason:
        run.blocked_reason = reason
        audit_log.append(session, actor=actor, event_type="screening.run_blocked",
                         decision="deny", subject=run.id,
                         payload={"reason": reason, "screened": run.screened_datums,
                                  "flagged": run.flagged_datums,
                                  "affirmative_openers": run.affirmative_openers,
                                  "screening_policy_sha256": screener.config.sha256})
        return reason
    return None
