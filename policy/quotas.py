"""Quotas: whether an admitted request fits what its person has left, decided and
reserved in the same transaction that queues the request.

Quotas belong to the person (principal), not to the API key: every key of a person draws
on one budget, and the limits are the tightest of the person's usable keys
(policy.scopes.person_limits), so another key never adds budget or rate. Per person:
training tokens and sampled tokens per UTC day, summed over all their keys (reserved at
admission, settled when the future finishes — see audit.usage; a dry run's screened tokens
are training tokens, consumed on the spot), training runs alive at once and checkpoints
stored, both counted over the runs the person owns whichever key created them, and release
evaluations queued per UTC day through any of their keys.

A run holds a slot while it is alive (`live_runs`). A run whose session is finished no
longer trains (gateway.ownership refuses it), and a run that went silent gave up its slot:
using it again (`Charge.uses_run`) takes a slot again, or is refused when none is free.

`check` is the read-only test that runs before expensive work; `reserve`/`consume`
decide. Before counting, they lock the person's row (PostgreSQL: SELECT … FOR UPDATE;
SQLite: the write transaction already holds the database's write lock), after any run row
and before any audit row, so requests racing for the last unit through any of the
person's keys are serialized and exactly one gets it. Must not import fastapi or engine.
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
from policy.keys import unusable_because
from policy.scopes import QUOTA_FIELDS, Scopes, effective, person_limits
from policy.screening.tally import principal_tally

# A run counts as alive while its SDK session heartbeats (the SDK sends one every 10 s)
# or the run is used; after this long without either, it no longer holds a slot.
RUN_IDLE_SECONDS = 120


class QuotaExceeded(PolicyError):
    """The person has no quota left for this request (HTTP 403, code quota_exceeded)."""

    def __init__(self, quota: str, message: str, resets: str) -> None:
        super().__init__(f"quota {quota} exceeded: {message}; {resets}")
        self.quota = quota


@dataclass(frozen=True)
class Charge:
    """What a request will consume, declared by the route that admits it."""

    training_tokens: int = 0
    sampled_tokens: int = 0
    new_run: str | None = None  # the id of the training run this request creates
    uses_run: str | None = None  # an existing run this request trains or saves: it needs a slot
    checkpoint: bool = False  # stores a new checkpoint (not an overwrite)
    release_evaluation: bool = False  # queues a release evaluation
    training_run_id: str = ""  # the run the usage is attributed to

    def __bool__(self) -> bool:
        return bool(self.training_tokens or self.sampled_tokens or self.new_run
                    or self.uses_run or self.checkpoint or self.release_evaluation)


@dataclass(frozen=True)
class Person:
    """Whose budget a request draws on: the key's principal, all their keys (usage of
    revoked and expired ones still counts), and the limits they are held to."""

    principal_id: str
    key_ids: tuple[str, ...]
    limits: Scopes


def person_of(session: Session, key_id: str, scopes: Scopes,
              now: dt.datetime | None = None) -> Person:
    """The person behind `key_id` (whose own scopes are `scopes`), with the limits of all
    their usable keys."""
    return _person(session, _principal_of(session, key_id), key_id, scopes, now or utcnow())


def _principal_of(session: Session, key_id: str) -> str:
    principal_id = session.scalar(select(ApiKey.principal_id).where(ApiKey.id == key_id))
    if principal_id is None:
        raise PolicyError(f"API key {key_id} not found")
    return str(principal_id)


def _person(session: Session, principal_id: str, key_id: str, scopes: Scopes,
            now: dt.datetime) -> Person:
    keys = session.execute(select(ApiKey.id, ApiKey.status, ApiKey.expires_at, ApiKey.scopes)
                           .where(ApiKey.principal_id == principal_id)).all()
    others = [k.scopes for k in keys if k.id != key_id and _usable(k.status, k.expires_at, now)]
    return Person(principal_id=principal_id, key_ids=tuple(k.id for k in keys),
                  limits=person_limits(scopes, others))


def _usable(status: str, expires_at: dt.datetime | None, now: dt.datetime) -> bool:
    return unusable_because(status, expires_at, now) is None


def check(session: Session, key_id: str, scopes: Scopes, charge: Charge,
          now: dt.datetime | None = None) -> None:
    """Raise QuotaExceeded (naming the quota and when it frees up) unless the charge fits
    what the key's person has left. Read-only and unlocked on its own: the cheap check
    that runs before expensive work (screening, evaluation); `reserve` and `consume`
    decide."""
    now = now or utcnow()
    _check(session, person_of(session, key_id, scopes, now), charge, now)


def _check(session: Session, who: Person, charge: Charge, now: dt.datetime) -> None:
    day = usage.utc_day(now)
    if charge.training_tokens or charge.sampled_tokens:
        _check_day_budgets(session, who, charge, day, now)
    if charge.new_run:
        _check_live_runs(session, who, charge.new_run, now)
    if charge.uses_run:
        _check_run_holds_slot(session, who, charge.uses_run, now)
    if charge.checkpoint:
        _check_checkpoints(session, who)
    if charge.release_evaluation:
        _check_release_evaluations(session, who, day, now)


def reserve(session: Session, key_id: str, scopes: Scopes, charge: Charge,
            now: dt.datetime | None = None) -> usage.Reservation:
    """Check every quota the charge touches and record the reservation (settled when the
    request's future finishes), or raise QuotaExceeded."""
    now = now or utcnow()
    who = _lock_person(session, key_id, scopes, now)
    _check(session, who, charge, now)
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
    who = _lock_person(session, key_id, scopes, now)
    _check(session, who, charge, now)
    usage.record_used(session, key_id, usage.utc_day(now), charge.training_run_id,
                      {"training_tokens": charge.training_tokens,
                       "sampled_tokens": charge.sampled_tokens})


def _lock_person(session: Session, key_id: str, scopes: Scopes, now: dt.datetime) -> Person:
    """Lock the key's principal's row (the lock policy.screening.tally.lock_principal
    takes, without re-reading the row), then read the person's keys and limits."""
    principal_id = _principal_of(session, key_id)
    # FOR UPDATE compiles to nothing on SQLite, where BEGIN IMMEDIATE already serializes.
    session.execute(select(Principal.id).where(Principal.id == principal_id)
                    .with_for_update())
    return _person(session, principal_id, key_id, scopes, now)


def day_totals(session: Session, key_ids: tuple[str, ...] | list[str], day: str
               ) -> dict[str, int]:
    """Used and reserved tokens of a person's keys on one day, summed."""
    sums = dict.fromkeys(("training_tokens", "training_tokens_reserved", "sampled_tokens",
                          "sampled_tokens_reserved"), 0)
    for key_id in key_ids:
        for name, value in usage.day_totals(session, key_id, day).items():
            sums[name] += value
    return sums


def _check_day_budgets(session: Session, who: Person, charge: Charge, day: str,
                       now: dt.datetime) -> None:
    totals = day_totals(session, who.key_ids, day)
    resets = f"it resets at {usage.next_utc_midnight(now).isoformat().replace('+00:00', 'Z')}"
    budgets = (("training_tokens_per_day", "training_tokens", charge.training_tokens,
                who.limits.training_tokens_per_day, "training tokens"),
               ("sampled_tokens_per_day", "sampled_tokens", charge.sampled_tokens,
                who.limits.sampled_tokens_per_day,
                "sampled tokens (num_samples × max_tokens, plus the prompt when it is scored)"))
    for quota, field, asked, limit, what in budgets:
        if not asked:
            continue
        held = totals[field] + totals[f"{field}_reserved"]
        if held + asked > limit:
            raise QuotaExceeded(
                quota, f"this request needs {asked:,} {what}, and {held:,} of today's "
                f"{limit:,} (shared by all your API keys) are used or reserved", resets)


def live_runs(session: Session, principal_id: str, now: dt.datetime,
              exclude: str = "") -> list[str]:
    """Runs of this person that still hold a slot, whichever key created them: not
    failed, their session not finished, and heard from (heartbeat or use) within
    RUN_IDLE_SECONDS or with work queued (a silent run admitted again holds its slot from
    admission)."""
    cutoff = now - dt.timedelta(seconds=RUN_IDLE_SECONDS)
    rows = session.execute(
        select(TrainingRun.id, TrainingRun.last_request_time, ClientSession.created_at,
               ClientSession.last_heartbeat_at)
        .join(ClientSession, ClientSession.id == TrainingRun.session_id)
        .where(TrainingRun.principal_id == principal_id, TrainingRun.id != exclude,
               TrainingRun.status.in_(("creating", "active")),
               ClientSession.finished_at.is_(None))).all()
    heard = {run_id: max(as_utc(t) for t in seen if t is not None) >= cutoff
             for run_id, *seen in rows}
    silent = [run_id for run_id, fresh in heard.items() if not fresh]
    busy = set(session.scalars(
        select(Future.model_id).where(Future.model_id.in_(silent),
                                      Future.status.in_(("pending", "running"))))
               ) if silent else set()
    return [run_id for run_id, fresh in heard.items() if fresh or run_id in busy]


def _check_live_runs(session: Session, who: Person, new_run: str, now: dt.datetime) -> None:
    alive = live_runs(session, who.principal_id, now, exclude=new_run)
    limit = who.limits.concurrent_training_runs
    if len(alive) >= limit:
        raise QuotaExceeded(
            "concurrent_training_runs", f"{len(alive)} of {limit} training runs are alive",
            f"a run frees its slot {RUN_IDLE_SECONDS} s after its session stops "
            "heartbeating (close the other ServiceClient)")


def _check_run_holds_slot(session: Session, who: Person, run_id: str,
                          now: dt.datetime) -> None:
    """A run used again after it went silent (and so gave up its slot) must find one free.
    Another person's run, or one whose session is finished, is left to the ownership
    check, which refuses it (404, 400)."""
    owner = session.execute(
        select(TrainingRun.principal_id, ClientSession.finished_at)
        .join(ClientSession, ClientSession.id == TrainingRun.session_id)
        .where(TrainingRun.id == run_id)).first()
    if owner is None or owner[0] != who.principal_id or owner[1] is not None:
        return
    alive = live_runs(session, who.principal_id, now)
    limit = who.limits.concurrent_training_runs
    if run_id not in alive and len(alive) >= limit:
        raise QuotaExceeded(
            "concurrent_training_runs",
            f"training run {run_id} was silent for over {RUN_IDLE_SECONDS} s and gave up its "
            f"slot, and {len(alive)} of {limit} training runs are alive",
            "close another ServiceClient to free a slot")


def stored_checkpoints(session: Session, who: Person) -> int:
    """Checkpoints of the person's runs (whichever key saved them), plus saves admitted
    through any of their keys but not yet written."""
    stored = session.scalar(
        select(func.count(Checkpoint.id))
        .join(TrainingRun, TrainingRun.id == Checkpoint.training_run_id)
        .where(TrainingRun.principal_id == who.principal_id)) or 0
    pending = session.scalar(
        select(func.count(Future.request_id))
        .where(Future.api_key_id.in_(who.key_ids), Future.status.in_(("pending", "running")),
               Future.quota_reservation.contains(usage.CHECKPOINT_MARK))) or 0
    return int(stored) + int(pending)


def _check_checkpoints(session: Session, who: Person) -> None:
    held = stored_checkpoints(session, who)
    if held + 1 > who.limits.checkpoints_stored:
        raise QuotaExceeded(
            "checkpoints_stored",
            f"{held} of {who.limits.checkpoints_stored} checkpoints are stored or being saved",
            "delete a checkpoint (RestClient.delete_checkpoint) to free a slot")


def release_evaluations(session: Session, key_ids: tuple[str, ...] | list[str],
                        day: str) -> int:
    """Release evaluations these keys queued on `day` (their futures that reserved one)."""
    return int(session.scalar(
        select(func.count(Future.request_id))
        .where(Future.api_key_id.in_(key_ids),
               Future.quota_reservation.contains(usage.RELEASE_EVALUATION_MARK),
               Future.quota_reservation.contains(usage.day_mark(day)))) or 0)


def _check_release_evaluations(session: Session, who: Person, day: str,
                               now: dt.datetime) -> None:
    held = release_evaluations(session, who.key_ids, day)
    limit = who.limits.release_evaluations_per_day
    if held + 1 > limit:
        resets = usage.next_utc_midnight(now).isoformat().replace("+00:00", "Z")
        raise QuotaExceeded(
            "release_evaluations_per_day",
            f"{held} of today's {limit} release evaluations are used",
            f"it resets at {resets}")


def usage_report(session: Session, principal_ids: list[str] | None, defaults: Scopes,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """Per person (today's budgets and the counts the quotas judge, against the limits they
    are held to), per key (what each key used, and its own scopes) and per training run
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
    owners = {p.id: p for _, p in [*key_rows, *run_rows]}
    live = {pid: live_runs(session, pid, now) for pid in owners}
    alive = {run_id for runs in live.values() for run_id in runs}
    resets = usage.next_utc_midnight(now).isoformat()
    keys = []
    for key, owner in key_rows:
        scopes = effective(defaults, key.scopes)
        mine = [r for r, _ in run_rows if r.api_key_id == key.id]
        keys.append({
            "key_id": key.id, "prefix": key.prefix, "owner": owner.name, "status": key.status,
            "owner_screening": principal_tally(owner),
            "today": {"day": day, "resets_at": resets,
                      **usage.day_totals(session, key.id, day),
                      "training_tokens_per_day": scopes.training_tokens_per_day,
                      "sampled_tokens_per_day": scopes.sampled_tokens_per_day},
            "live_training_runs": sum(r.id in alive for r in mine),
            "concurrent_training_runs": scopes.concurrent_training_runs,
            "checkpoints_stored": scopes.checkpoints_stored,
            "total": totals[key.id],
            # The screening tally per key: the tallies of the runs it created, summed.
            "screening": {"screened": sum(r.screened_datums for r in mine),
                          "flagged": sum(r.flagged_datums for r in mine),
                          "blocked_runs": sum(bool(r.blocked_reason) for r in mine)},
        })
    runs = [{"training_run_id": run.id, "owner": owner.name, "key_id": run.api_key_id,
             "base_model": run.base_model, **per_run[run.id],
             "screening": {"screened": run.screened_datums, "flagged": run.flagged_datums,
                           "affirmative_openers": run.affirmative_openers,
                           "blocked": run.blocked_reason}} for run, owner in run_rows]
    people = [_person_usage(session, owner, [k for k, _ in key_rows if k.principal_id == pid],
                            totals, defaults, day, resets, now) | {
                  "live_training_runs": len(live[pid])}
              for pid, owner in owners.items()]
    return {"principals": people, "keys": keys, "training_runs": runs}


def _person_usage(session: Session, owner: Principal, keys: list[ApiKey],
                  totals: dict[str, dict[str, int]], defaults: Scopes, day: str, resets: str,
                  now: dt.datetime) -> dict[str, Any]:
    """One person's entry (all but their live runs): what the quotas count for them,
    against their limits (the tightest of their usable keys; the defaults when none is
    usable)."""
    usable = [k for k in keys if _usable(k.status, k.expires_at, now)]
    limits = (person_limits(effective(defaults, usable[0].scopes), [k.scopes for k in usable[1:]])
              if usable else defaults)
    who = Person(principal_id=owner.id, key_ids=tuple(k.id for k in keys), limits=limits)
    total: dict[str, int] = {}
    for key in keys:
        for name, value in totals[key.id].items():
            total[name] = total.get(name, 0) + value
    return {
        "principal_id": owner.id, "owner": owner.name, "key_ids": list(who.key_ids),
        "limits": {name: getattr(limits, name) for name in QUOTA_FIELDS},
        "today": {"day": day, "resets_at": resets, **day_totals(session, who.key_ids, day),
                  "training_tokens_per_day": limits.training_tokens_per_day,
                  "sampled_tokens_per_day": limits.sampled_tokens_per_day,
                  "release_evaluations": release_evaluations(session, who.key_ids, day),
                  "release_evaluations_per_day": limits.release_evaluations_per_day},
        "concurrent_training_runs": limits.concurrent_training_runs,
        "stored_checkpoints": stored_checkpoints(session, who),
        "checkpoints_stored": limits.checkpoints_stored,
        "total": total,
    }
