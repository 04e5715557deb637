"""Quotas: whether an admitted request fits what its API key has left, decided and
reserved in the same transaction that queues the request.

Per key: training tokens and sampled tokens per UTC day (reserved at admission, settled
when the future finishes — see audit.usage; a dry run's screened tokens are training
tokens, consumed on the spot), training runs alive at once, checkpoints stored, and
release evaluations queued per UTC day. `check` is the read-only test that runs before
expensive work; `reserve`/`consume` decide. Before counting, they lock the key's row
(PostgreSQL: SELECT … FOR UPDATE; SQLite: the write transaction already holds the
database's write lock), so requests racing for the last unit are serialized and exactly
one gets it. Must not import fastapi or engine.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from audit import usage
from audit.models import (
    ApiKey,
    Checkpoint,
    ClientSession,
    Future,
    Principal,
    TrainingRun,
    as_utc,
    utcnow,
)
from policy.errors import PolicyError
from policy.scopes import Scopes, effective
from policy.screening.tally import principal_tally

# A run counts as alive while its SDK session heartbeats (the SDK sends one every 10 s)
# or the run is used; after this long without either, it no longer holds a slot.
RUN_IDLE_SECONDS = 120


class QuotaExceeded(PolicyError):
    """The key has no quota left for this request (HTTP 403, code quota_exceeded)."""

    def __init__(self, quota: str, message: str, resets: str) -> None:
        super().__init__(f"quota {quota} exceeded: {message}; {resets}")
        self.quota = quota


@dataclass(frozen=True)
class Charge:
    """What a request will consume, declared by the route that admits it."""

    training_tokens: int = 0
    sampled_tokens: int = 0
    new_run: str | None = None  # the id of the training run this request creates
    checkpoint: bool = False  # stores a new checkpoint (not an overwrite)
    release_evaluation: bool = False  # queues a release evaluation
    training_run_id: str = ""  # the run the usage is attributed to

    def __bool__(self) -> bool:
        return bool(self.training_tokens or self.sampled_tokens or self.new_run
                    or self.checkpoint or self.release_evaluation)


def check(session: Session, key_id: str, scopes: Scopes, charge: Charge,
          now: dt.datetime | None = None) -> None:
    """Raise QuotaExceeded (naming the quota and when it frees up) unless the charge fits
    what the key has left. Read-only and unlocked on its own: the cheap check that runs
    before expensive work (screening, evaluation); `reserve` and `consume` decide."""
    now = now or utcnow()
    day = usage.utc_day(now)
    if charge.training_tokens or charge.sampled_tokens:
        _check_day_budgets(session, key_id, scopes, charge, day, now)
    if charge.new_run:
        _check_live_runs(session, key_id, scopes, charge.new_run, now)
    if charge.checkpoint:
        _check_checkpoints(session, key_id, scopes)
    if charge.release_evaluation:
        _check_release_evaluations(session, key_id, scopes, day, now)


def reserve(session: Session, key_id: str, scopes: Scopes, charge: Charge,
            now: dt.datetime | None = None) -> usage.Reservation:
    """Check every quota the charge touches and record the reservation (settled when the
    request's future finishes), or raise QuotaExceeded."""
    now = now or utcnow()
    _lock_key(session, key_id)
    check(session, key_id, scopes, charge, now)
    reservation = usage.Reservation(
        api_key_id=key_id, day=usage.utc_day(now), training_run_id=charge.training_run_id,
        training_tokens=charge.training_tokens, sampled_tokens=charge.sampled_tokens,
        checkpoint=charge.checkpoint, release_evaluation=charge.release_evaluation)
    usage.record_reservation(session, reservation)
    return reservation


def consume(session: Session, key_id: str, scopes: Scopes, charge: Charge,
            now: dt.datetime | None = None) -> None:
    """Charge work done on the spot, with no future to settle (a dry run's screening):
    check the quotas, then count the tokens as used."""
    now = now or utcnow()
    _lock_key(session, key_id)
    check(session, key_id, scopes, charge, now)
    usage.record_used(session, key_id, usage.utc_day(now), charge.training_run_id,
                      {"training_tokens": charge.training_tokens,
                       "sampled_tokens": charge.sampled_tokens})


def _lock_key(session: Session, key_id: str) -> None:
    # FOR UPDATE compiles to nothing on SQLite, where BEGIN IMMEDIATE already serializes.
    session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())


def _check_day_budgets(session: Session, key_id: str, scopes: Scopes, charge: Charge,
                       day: str, now: dt.datetime) -> None:
    totals = usage.day_totals(session, key_id, day)
    resets = f"it resets at {usage.next_utc_midnight(now).isoformat().replace('+00:00', 'Z')}"
    budgets = (("training_tokens_per_day", "training_tokens", charge.training_tokens,
                scopes.training_tokens_per_day, "training tokens"),
               ("sampled_tokens_per_day", "sampled_tokens", charge.sampled_tokens,
                scopes.sampled_tokens_per_day,
                "sampled tokens (num_samples × max_tokens, plus the prompt when it is scored)"))
    for quota, field, asked, limit, what in budgets:
        if not asked:
            continue
        held = totals[field] + totals[f"{field}_reserved"]
        if held + asked > limit:
            raise QuotaExceeded(
                quota, f"this request needs {asked:,} {what}, and {held:,} of today's "
                f"{limit:,} are used or reserved", resets)


def live_runs(session: Session, key_id: str, now: dt.datetime, exclude: str = "") -> list[str]:
    """Runs of this key that still hold a slot: not failed, their session not finished,
    and heard from (heartbeat or use) within RUN_IDLE_SECONDS."""
    cutoff = now - dt.timedelta(seconds=RUN_IDLE_SECONDS)
    rows = session.execute(
        select(TrainingRun.id, TrainingRun.last_request_time, ClientSession.created_at,
               ClientSession.last_heartbeat_at)
        .join(ClientSession, ClientSession.id == TrainingRun.session_id)
        .where(TrainingRun.api_key_id == key_id, TrainingRun.id != exclude,
               TrainingRun.status.in_(("creating", "active")),
               ClientSession.finished_at.is_(None))).all()
    return [run_id for run_id, *seen in rows
            if max(as_utc(t) for t in seen if t is not None) >= cutoff]


def _check_live_runs(session: Session, key_id: str, scopes: Scopes, new_run: str,
                     now: dt.datetime) -> None:
    alive = live_runs(session, key_id, now, exclude=new_run)
    if len(alive) >= scopes.concurrent_training_runs:
        raise QuotaExceeded(
            "concurrent_training_runs",
            f"{len(alive)} of {scopes.concurrent_training_runs} training runs are alive",
            f"a run frees its slot {RUN_IDLE_SECONDS} s after its session stops "
            "heartbeating (close the other ServiceClient)")


def stored_checkpoints(session: Session, key_id: str) -> int:
    """Checkpoints of this key's runs, plus saves admitted but not yet written."""
    stored = session.scalar(
        select(func.count(Checkpoint.id))
        .join(TrainingRun, TrainingRun.id == Checkpoint.training_run_id)
        .where(TrainingRun.api_key_id == key_id)) or 0
    pending = session.scalar(
        select(func.count(Future.request_id))
        .where(Future.api_key_id == key_id, Future.status.in_(("pending", "running")),
               Future.quota_reservation.contains(usage.CHECKPOINT_MARK))) or 0
    return int(stored) + int(pending)


def _check_checkpoints(session: Session, key_id: str, scopes: Scopes) -> None:
    held = stored_checkpoints(session, key_id)
    if held + 1 > scopes.checkpoints_stored:
        raise QuotaExceeded(
            "checkpoints_stored",
            f"{held} of {scopes.checkpoints_stored} checkpoints are stored or being saved",
            "delete a checkpoint (RestClient.delete_checkpoint) to free a slot")


def release_evaluations(session: Session, key_id: str, day: str) -> int:
    """Release evaluations this key queued on `day` (its futures that reserved one)."""
    return int(session.scalar(
        select(func.count(Future.request_id))
        .where(Future.api_key_id == key_id,
               Future.quota_reservation.contains(usage.RELEASE_EVALUATION_MARK),
               Future.quota_reservation.contains(usage.day_mark(day)))) or 0)


def _check_release_evaluations(session: Session, key_id: str, scopes: Scopes, day: str,
                               now: dt.datetime) -> None:
    held = release_evaluations(session, key_id, day)
    if held + 1 > scopes.release_evaluations_per_day:
        resets = usage.next_utc_midnight(now).isoformat().replace("+00:00", "Z")
        raise QuotaExceeded(
            "release_evaluations_per_day",
            f"{held} of today's {scopes.release_evaluations_per_day} release evaluations "
            "are used", f"it resets at {resets}")


def usage_report(session: Session, principal_ids: list[str] | None, defaults: Scopes,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """Per key (today's budgets against its scopes, all-time totals) and per training run
    (tokens, checkpoints): for the given principals, or everyone when None."""
    now = now or utcnow()
    day = usage.utc_day(now)
    key_stmt = (select(ApiKey, Principal).join(Principal, Principal.id == ApiKey.principal_id)
                .order_by(ApiKey.created_at))
    run_stmt = (select(TrainingRun, Principal)
                .join(Principal, Principal.id == TrainingRun.principal_id)
                .order_by(TrainingRun.created_at))
    if principal_ids is not None:
        key_stmt = key_stmt.where(ApiKey.principal_id.in_(principal_ids))
        run_stmt = run_stmt.where(TrainingRun.principal_id.in_(principal_ids))
    key_rows = session.execute(key_stmt).all()
    run_rows = session.execute(run_stmt).all()
    totals = usage.usage_by_key(session, [k.id for k, _ in key_rows])
    per_run = usage.usage_by_run(session, [r.id for r, _ in run_rows])
    resets = usage.next_utc_midnight(now).isoformat()
    keys = []
    for key, owner in key_rows:
        scopes = effective(defaults, key.scopes)
        keys.append({
            "key_id": key.id, "prefix": key.prefix, "owner": owner.name, "status": key.status,
            "owner_screening": principal_tally(owner),
            "today": {"day": day, "resets_at": resets,
                      **usage.day_totals(session, key.id, day),
                      "training_tokens_per_day": scopes.training_tokens_per_day,
                      "sampled_tokens_per_day": scopes.sampled_tokens_per_day},
            "live_training_runs": len(live_runs(session, key.id, now)),
            "concurrent_training_runs": scopes.concurrent_training_runs,
            "checkpoints_stored": scopes.checkpoints_stored,
            "total": totals[key.id],
        })
    runs = [{"training_run_id": run.id, "owner": owner.name, "key_id": run.api_key_id,
             "base_model": run.base_model, **per_run[run.id],
             "screening": {"screened": run.screened_datums, "flagged": run.flagged_datums,
                           "affirmative_openers": run.affirmative_openers,
                           "blocked": run.blocked_reason}} for run, owner in run_rows]
    for entry in keys:  # the screening tally per key: its runs' tallies summed
        mine = [r for r, _ in run_rows if r.api_key_id == entry["key_id"]]
        entry["screening"] = {"screened": sum(r.screened_datums for r in mine),
                              "flagged": sum(r.flagged_datums for r in mine),
                              "blocked_runs": sum(bool(r.blocked_reason) for r in mine)}
    return {"keys": keys, "training_runs": runs}
