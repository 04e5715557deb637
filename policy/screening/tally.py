"""Each training run's screening tally, and the dataset-level decision to block the run.

Per-example screening refuses a flagged datum, but a classifier that flags 1% of everyday
text also misses some harmful text, so the decision that matters is about the *dataset*:
is this run's flagged share above what honest data produces? (reference/safety-methods.md:
a harmful set spread thinly over many calls, each call looking almost clean.) A fixed count
("3 flagged datums") blocks nearly every honest run of a few hundred examples and lets a
thinly spread harmful set through; the rule here scales with the run's size.

**The share test** (a sequential probability-ratio test that may be looked at any time).
The run has screened n distinct datums, k of them flagged, h of those with high confidence
(a flagged score at or above its category's `[high_confidence_thresholds]` value). Under
the null hypothesis the run is honest: each datum is flagged independently with
probability at most p0, the screens' calibrated flag rate on everyday data
(`null_flag_rate`), and flagged with high confidence with probability at most p0h
(`null_high_confidence_rate`, calibrated the same way, far below p0). Each datum falls in
one of three cells — clean, flagged below high confidence, flagged with high confidence —
with null probabilities (1 - p0, p0 - p0h, p0h). For an alternative (1 - qm - qh, qm, qh)
the likelihood ratio

    L(q) = (qm/(p0-p0h))^(k-h) · (qh/p0h)^h · ((1-qm-qh)/(1-p0))^(n-k)

is, datum by datum, a non-negative supermartingale with mean at most 1 whenever the true
rates are at most p0 and p0h, provided the alternative raises the high-confidence cell at
least as much as the other flagged one (qh/p0h >= qm/(p0-p0h) >= 1): the expected factor is
linear in the true cell probabilities and largest at the null's corner, where it is 1. So
is the average L of L(q) over several alternatives (a mixture SPRT: it need not guess how
much harmful data is mixed in, nor how much of it the screens flag with high confidence;
it pays log(number of alternatives) nats for that). The alternatives raise the flagged
cell by r in {1} ∪ `alternative_ratios` and the high-confidence cell by r·m for m in
`high_confidence_ratios`. A harmful example reaches high confidence far more often than an
everyday one (25% against 0.07% for the shipped classifier), so a high-confidence flag is
much stronger evidence than an ordinary one, and counting it as such catches a thinly mixed
harmful set sooner (`python -m benchmarks.screening_sim`). With p0h = 0 the test has two
cells (flagged or not) and alternatives r·p0. By Ville's inequality, P(L ever reaches
1/alpha) <= alpha, over *every* n at once. The run is blocked when log L >= log(1/alpha).
So the overall false-alarm probability of an honest run is at most `alpha` however often it
is tested — after every batch, batches of any size, for millions of datums — with no
per-look correction to tune (Bonferroni or alpha-spending over looks would make the test
weaker the more often a caller sends small batches; here the number of looks does not
matter, since L depends only on n, k and h). L falls with every clean datum and rises with
every flagged one; honest data with a true rate somewhat above p0 (or p0h) still drifts
down, so a slightly miscalibrated rate does not block long honest runs. The exact
one-sided binomial tail P(X >= k | n, p0) is reported next to L in the audit trail for
readers (it is not what is tested: it is valid for one look only).

**The cap**: a flagged score at or above its category's `[high_confidence_thresholds]`
value is a high-confidence flag; `high_confidence_cap` distinct such datums block the run
whatever its size (set those thresholds where everyday data essentially never reaches).

**Affirmative openers**: more than `affirmative_share` of the run's completions opening
"Sure, here is…" (judged from `affirmative_min_completions` on) blocks it, as before.

**Distinct datums**: n, k and the high-confidence count add each datum (its SHA-256 over
everything screening read in it) once per run: RL loops resend the same datums and users
resend a batch without the datums refused in it, and padding n with repeats must not dilute
the share. A datum first seen clean and later flagged (e.g. after a threshold change) moves
from clean to flagged once. The digests live in `screening_tally_datums`.

**Per person, too.** A run's tally alone is evidence an attacker can leave behind: start a
new run once one nears its bar, or screen the data with the dry run (which reports flagged
indices) and train only what passed, so that no run ever sees a flag. Every datum screened
for a principal — in any of their runs or dry runs — is therefore also counted once in the
principal's own tally (`principal_tally_datums`), judged by the same rule whenever they
train (a dry run adds its datums but decides nothing by itself, so that trying the screens
on a few examples blocks nobody; screening a dataset and then training what passed is
judged on all of it). The share test only: the absolute cap on high-confidence flags
bounds what one run's weights learn, and a person's tally grows over every run they ever
train, so at the everyday high-confidence rate an honest person would reach any fixed cap
in the end. When the rule calls for it the principal is blocked
(`screening_blocked_reason`): their runs, and runs that
descend from them, can no longer be trained, sampled or released, and they can start no
run and no dry run, until an admin has reviewed the evidence and reinstated them, which
starts their tally afresh. An honest person's data is flagged at the everyday rate wherever
it is screened, so the bound on blocking them holds for the sum as for one run.

Must not import fastapi or engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import Principal, PrincipalTallyDatum, ScreeningTallyDatum, TrainingRun
from policy.errors import PolicyError
from policy.screening.screener import ScreeningConfig, TallyLimits


class RunBlocked(PolicyError):
    """A training run blocked by its screening tally (HTTP 403, code run_blocked)."""


class PrincipalNotFound(PolicyError):
    """No such principal (HTTP 404)."""


class PrincipalBlocked(RunBlocked):
    """A person blocked by their screening tally: none of their runs may be trained,
    sampled or released, and they may start no run or dry run (HTTP 403, run_blocked)."""


@dataclass(frozen=True)
class TallyCounts:
    screened: int  # n: distinct datums screened in the run
    flagged: int  # k: distinct datums flagged
    high_confidence: int  # distinct datums with a high-confidence flag
    affirmative: int = 0  # completions opening "Sure, here is…"
    completions: int = 0


@dataclass(frozen=True)
class Block:
    reason: str  # what the owner is told (counts, no scores)
    statistic: dict[str, Any]  # for the audit trail


def alternatives(limits: TallyLimits) -> list[tuple[float, float]]:
    """The share test's alternatives as (rate flagged below high confidence, rate flagged
    with high confidence) pairs; with no high-confidence null rate, (rate flagged, 0)."""
    p0, p0h = limits.null_flag_rate, limits.null_high_confidence_rate
    if p0h <= 0:
        return [(min(r * p0, 1.0 - 1e-9), 0.0) for r in limits.alternative_ratios]
    pairs = []
    for r in (1.0, *limits.alternative_ratios):
        for m in limits.high_confidence_ratios:
            qm, qh = r * (p0 - p0h), r * m * p0h
            if r * m > 1.0 and qm + qh < 1.0:
                pairs.append((qm, qh))
    return pairs


def log_likelihood_ratio(n: int, k: int, high: int, limits: TallyLimits) -> float:
    """log of the mixture likelihood ratio for n distinct datums, k flagged, `high` of them
    with high confidence: the mean over the alternatives of L(q). 0 for an empty run;
    grows with k and high, falls with n - k."""
    if not 0 <= high <= k <= n:
        raise ValueError(f"need 0 <= high <= k <= n, got n={n}, k={k}, high={high}")
    return float(log_likelihood_ratios(np.asarray(n), np.asarray(k), np.asarray(high), limits))


def log_likelihood_ratios(n: np.ndarray, k: np.ndarray, high: np.ndarray,
                          limits: TallyLimits) -> np.ndarray:
    """`log_likelihood_ratio` element-wise over arrays of counts (for simulations)."""
    p0, p0h = limits.null_flag_rate, limits.null_high_confidence_rate
    n, k, high = (np.asarray(x, dtype=np.float64) for x in (n, k, high))
    if p0h <= 0:  # two cells: high-confidence flags are ordinary flags
        high = np.zeros_like(high)
    terms = []
    for qm, qh in alternatives(limits):
        term = (k - high) * math.log(qm / (p0 - p0h)) \
            + (n - k) * math.log((1.0 - qm - qh) / (1.0 - p0))
        terms.append(term + high * math.log(qh / p0h) if p0h > 0 else term)
    return np.logaddexp.reduce(np.stack(terms), axis=0) - math.log(len(terms))


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (summed in log space)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def share_test(n: int, k: int, limits: TallyLimits, high: int = 0) -> dict[str, Any]:
    """The share test's numbers for n screened and k flagged distinct datums, `high` of
    them with high confidence."""
    llr = log_likelihood_ratio(n, k, high, limits)
    threshold = math.log(1.0 / limits.alpha)
    return {"test": "mixture_sprt", "n": n, "k": k, "high_confidence": high,
            "p0": limits.null_flag_rate, "p0_high_confidence": limits.null_high_confidence_rate,
            "alternative_ratios": list(limits.alternative_ratios),
            "high_confidence_ratios": list(limits.high_confidence_ratios), "alpha": limits.alpha,
            "log_likelihood_ratio": round(llr, 4), "log_threshold": round(threshold, 4),
            "binomial_tail_p": binomial_tail(n, k, limits.null_flag_rate),
            "significant": llr >= threshold}


def min_flags_to_block(n: int, limits: TallyLimits, high: int = 0) -> int | None:
    """The fewest flagged among n distinct datums that the share test blocks when `high`
    of them are flagged with high confidence (None: even n of n would not). Non-decreasing
    in n; used by the tests."""
    threshold = math.log(1.0 / limits.alpha)
    if high > n:
        return None

    def significant(k: int) -> bool:
        return log_likelihood_ratio(n, max(k, high), high, limits) >= threshold

    if not significant(n):
        return None
    lo, hi = high, n
    while lo < hi:
        mid = (lo + hi) // 2
        if significant(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def decide(counts: TallyCounts, limits: TallyLimits, *, cap: bool = True) -> Block | None:
    """Block the run, or None. The cap first (unless `cap` is off), then the share test,
    then the openers."""
    stats = share_test(counts.screened, counts.flagged, limits, counts.high_confidence)
    stats["high_confidence_cap"] = limits.high_confidence_cap if cap else None
    if cap and counts.high_confidence >= limits.high_confidence_cap:
        return Block(f"{counts.high_confidence} training datums flagged with high confidence, "
                     f"the limit is {limits.high_confidence_cap}", stats)
    if stats["significant"]:
        high = f" ({counts.high_confidence} with high confidence)" \
            if counts.high_confidence else ""
        return Block(f"{counts.flagged} of {counts.screened} distinct training datums flagged"
                     f"{high}, significantly more than everyday data produces", stats)
    if (counts.completions >= limits.affirmative_min_completions
            and counts.affirmative / max(counts.completions, 1) > limits.affirmative_share):
        return Block(f"{counts.affirmative} of {counts.completions} completions open with an "
                     f"affirmative prefix, above the limit of {limits.affirmative_share:.0%}",
                     stats)
    return None


def is_high_confidence(scores: dict[str, float], config: ScreeningConfig) -> bool:
    """Does any flagged "classifier.category" score reach its high-confidence threshold?"""
    for key, score in scores.items():
        threshold = config.high_confidence_threshold(key)
        if threshold is not None and score >= threshold:
            return True
    return False


def check_not_blocked(run: TrainingRun) -> None:
    if run.blocked_reason:
        raise RunBlocked(f"training run {run.id} is blocked by screening ({run.blocked_reason});"
                         " it cannot be trained, sampled or released. Start a new run with "
                         "data that passes screening")


def lock_run(session: Session, run_id: str) -> TrainingRun:
    """The run, re-read and locked for its tally (FOR UPDATE on PostgreSQL; on SQLite the
    write transaction already serializes). Take it before appending audit rows: an append
    holds the audit head's lock to the end of the transaction, and a request that holds
    the run appends its own row last."""
    return session.scalars(select(TrainingRun).where(TrainingRun.id == run_id)
                           .with_for_update()
                           .execution_options(populate_existing=True)).one()


def record_tally(session: Session, run_id: str, *, datum_sha256: Sequence[str],
                 flagged: Sequence[int], flag_scores: dict[int, dict[str, float]],
                 affirmative: int, completions: int, config: ScreeningConfig, actor: str,
                 request_id: str = "") -> tuple[TrainingRun, Block | None]:
    """Add one screened batch's distinct new datums to the run's tally and block the run
    (audited, with the test statistic) when the tally calls for it. Returns the run and
    the block this batch caused, if any.

    `datum_sha256` has one digest per datum of the batch, `flagged` the flagged indices and
    `flag_scores` their flagged "classifier.category" scores. The run row is locked first
    (FOR UPDATE on PostgreSQL; on SQLite the write transaction already serializes), so
    concurrent batches of one run count each datum once. Affirmative openers come per batch,
    not per datum: a batch of only new datums adds them exactly, one of only repeats adds
    nothing, and a mixed one adds at most its new datums as openers and at least its
    completions minus its repeats as completions (the share can only be over-, never
    under-stated, so repeats cannot dilute it)."""
    marks = datum_marks(datum_sha256, flagged, flag_scores, config)
    run = lock_run(session, run_id)
    seen = _seen(session, ScreeningTallyDatum, ScreeningTallyDatum.training_run_id == run_id,
                 list(marks))
    new, new_flagged, new_high = _merge_marks(
        session, marks, seen,
        lambda digest, f, h: ScreeningTallyDatum(training_run_id=run_id, datum_sha256=digest,
                                                 flagged=f, high_confidence=h))
    repeats = len(datum_sha256) - new
    run.screened_datums += new
    run.flagged_datums += new_flagged
    run.high_confidence_flags += new_high
    if new:
        run.affirmative_openers += affirmative if not repeats else min(affirmative, new)
        run.screened_completions += max(0, completions - repeats)
    return run, block_if_due(session, run, config, actor=actor, request_id=request_id)


def datum_marks(datum_sha256: Sequence[str], flagged: Sequence[int],
                flag_scores: dict[int, dict[str, float]], config: ScreeningConfig
                ) -> dict[str, tuple[bool, bool]]:
    """Per distinct digest of a batch: (flagged, flagged with high confidence)."""
    if any(not 0 <= i < len(datum_sha256) for i in flagged):
        raise ValueError("every flagged datum needs its digest (one SHA-256 per datum)")
    marks: dict[str, tuple[bool, bool]] = {}
    flagged_set = set(flagged)
    for i, digest in enumerate(datum_sha256):
        was_flagged, was_high = marks.get(digest, (False, False))
        is_flagged = i in flagged_set
        marks[digest] = (was_flagged or is_flagged, was_high or (
            is_flagged and is_high_confidence(flag_scores.get(i, {}), config)))
    return marks


def _seen(session: Session, table: Any, owner: Any, digests: list[str]) -> dict[str, Any]:
    """The rows of a tally `table` (ScreeningTallyDatum, PrincipalTallyDatum) that match
    `owner` and hold one of `digests`, by digest."""
    return {row.datum_sha256: row for row in session.scalars(
        select(table).where(owner, table.datum_sha256.in_(digests)))}


def _merge_marks(session: Session, marks: dict[str, tuple[bool, bool]], seen: dict[str, Any],
                 new_row: Any) -> tuple[int, int, int]:
    """Count a batch's marks against the digests a tally has `seen` (rows with `flagged`
    and `high_confidence`): a new digest adds a row (`new_row(digest, flagged, high)`), a
    seen one counts only a flag it did not have. Returns (new, newly flagged, newly high)."""
    new = new_flagged = new_high = 0
    for digest, (is_flagged, is_high) in marks.items():
        row = seen.get(digest)
        if row is None:
            session.add(new_row(digest, is_flagged, is_high))
            new += 1
            new_flagged += is_flagged
            new_high += is_high
            continue
        if is_flagged and not row.flagged:
            row.flagged = True
            new_flagged += 1
        if is_high and not row.high_confidence:
            row.high_confidence = True
            new_high += 1
    return new, new_flagged, new_high


def lock_principal(session: Session, principal_id: str) -> Principal:
    """The principal, re-read and locked for their tally (after any run lock: the order
    requests lock in)."""
    return session.scalars(select(Principal).where(Principal.id == principal_id)
                           .with_for_update()
                           .execution_options(populate_existing=True)).one()


def record_principal_tally(session: Session, principal_id: str, *,
                           marks: dict[str, tuple[bool, bool]], config: ScreeningConfig,
                           actor: str, request_id: str = "", where: str, judge: bool = True
                           ) -> tuple[Principal, Block | None]:
    """Add a batch's distinct datums (`datum_marks`) to the person's tally and, when
    `judge`, block them (audited as `screening.principal_blocked`, with the statistic and
    `where` the batch was screened) when the share test or the high-confidence cap calls
    for it. A dry run is not judged (it is the place to find out what the screens flag);
    its datums are judged with the next batch the person trains. Returns the principal and
    the block this batch caused, if any."""
    principal = lock_principal(session, principal_id)
    seen = _seen(session, PrincipalTallyDatum, PrincipalTallyDatum.principal_id == principal_id,
                 list(marks))
    new, new_flagged, new_high = _merge_marks(
        session, marks, seen,
        lambda digest, f, h: PrincipalTallyDatum(principal_id=principal_id,
                                                 datum_sha256=digest, flagged=f,
                                                 high_confidence=h))
    principal.screened_datums += new
    principal.flagged_datums += new_flagged
    principal.high_confidence_flags += new_high
    if not judge:
        return principal, None
    block = decide(TallyCounts(principal.screened_datums, principal.flagged_datums,
                               principal.high_confidence_flags), config.tally, cap=False)
    if block is None or principal.screening_blocked_reason:
        return principal, None
    principal.screening_blocked_reason = block.reason.replace(
        "training datums", "datums screened for this person")
    audit_log.append(session, actor=actor, event_type="screening.principal_blocked",
                     decision="deny", subject=principal_id, request_id=request_id,
                     payload={"reason": principal.screening_blocked_reason,
                              "statistic": block.statistic, "where": where,
                              "screened": principal.screened_datums,
                              "flagged": principal.flagged_datums,
                              "high_confidence_flags": principal.high_confidence_flags,
                              "screening_policy_sha256": config.sha256})
    return principal, block


def principal_tally(principal: Principal) -> dict[str, Any]:
    """A person's tally as reports show it (admin key listings, usage reports)."""
    return {"screened": principal.screened_datums, "flagged": principal.flagged_datums,
            "high_confidence_flags": principal.high_confidence_flags,
            "blocked": principal.screening_blocked_reason}


def check_principal_not_blocked(principal: Principal) -> None:
    if principal.screening_blocked_reason:
        raise PrincipalBlocked(
            f"{principal.name} is blocked by screening ({principal.screening_blocked_reason})"
            ": no run of theirs can be trained, sampled or released, and no new run or dry "
            "run started, until an admin has reviewed it and reinstated them")


def reinstate_principal(session: Session, principal_id: str, *, actor: str, reason: str,
                        request_id: str = "") -> Principal:
    """An admin reviewed a person's screening block and lifts it: audited with the counts
    it cleared; their tally starts afresh (every datum counts again). Runs blocked by their
    own tally stay blocked. Nobody reinstates themselves."""
    if actor == principal_id:
        raise PolicyError("you cannot reinstate yourself: another admin reviews the block")
    if session.get(Principal, principal_id) is None:
        raise PrincipalNotFound(f"principal {principal_id} not found")
    principal = lock_principal(session, principal_id)
    before = {"screened": principal.screened_datums, "flagged": principal.flagged_datums,
              "high_confidence_flags": principal.high_confidence_flags,
              "blocked_reason": principal.screening_blocked_reason}
    session.execute(delete(PrincipalTallyDatum)
                    .where(PrincipalTallyDatum.principal_id == principal_id))
    principal.screened_datums = principal.flagged_datums = principal.high_confidence_flags = 0
    principal.screening_blocked_reason = None
    audit_log.append(session, actor=actor, event_type="screening.principal_reinstated",
                     decision="allow", subject=principal_id, request_id=request_id,
                     payload={"reason": reason, "before": before})
    return principal


def block_if_due(session: Session, run: TrainingRun, config: ScreeningConfig, *, actor: str,
                 request_id: str = "", **evidence: Any) -> Block | None:
    """Block `run` (audited, with the test statistic and `evidence`) when its tally calls
    for it; the block this call caused, or None (also when it was blocked already)."""
    block = decide(TallyCounts(run.screened_datums, run.flagged_datums,
                               run.high_confidence_flags, run.affirmative_openers,
                               run.screened_completions), config.tally)
    if block is None or run.blocked_reason:
        return None
    run.blocked_reason = block.reason
    audit_log.append(session, actor=actor, event_type="screening.run_blocked",
                     decision="deny", subject=run.id, request_id=request_id,
                     payload={"reason": block.reason, "statistic": block.statistic,
                              "screened": run.screened_datums, "flagged": run.flagged_datums,
                              "high_confidence_flags": run.high_confidence_flags,
                              "affirmative_openers": run.affirmative_openers,
                              "completions": run.screened_completions,
                              "screening_policy_sha256": config.sha256, **evidence})
    return block
