"""Usage counters: the tokens each API key used per UTC day and training run, and the
tokens that admitted-but-unfinished requests hold reserved.

Owns the arithmetic on `usage_counters`: recording a reservation, settling a finished
future exactly once (the caller does it in the transaction that resolves the future),
and the sums behind usage reports. Must not decide whether a request fits a quota
(policy.quotas does) and must not import policy, engine or gateway.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from audit.models import Checkpoint, TrainingRun, UsageCounter, utcnow

TOKEN_FIELDS = ("training_tokens", "prefill_tokens", "sampled_tokens")


def utc_day(now: dt.datetime | None = None) -> str:
    return (now or utcnow()).astimezone(dt.UTC).strftime("%Y-%m-%d")


def next_utc_midnight(now: dt.datetime | None = None) -> dt.datetime:
    today = (now or utcnow()).astimezone(dt.UTC).date()
    return dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)


@dataclass(frozen=True)
class Reservation:
    """What one admitted request holds against its key until it finishes."""

    api_key_id: str
    day: str
    training_run_id: str = ""
    training_tokens: int = 0
    sampled_tokens: int = 0
    checkpoint: bool = False
    release_evaluation: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Reservation:
        return cls(**json.loads(text))


# Pending saves and queued release evaluations are found by these fragments of their
# reservation's JSON (sorted keys, no spaces).
CHECKPOINT_MARK = '"checkpoint":true'
RELEASE_EVALUATION_MARK = '"release_evaluation":true'


def day_mark(day: str) -> str:
    return f'"day":"{day}"'


def _counter(session: Session, key_id: str, day: str, run_id: str) -> UsageCounter:
    row = session.get(UsageCounter, (key_id, day, run_id))
    if row is None:
        row = UsageCounter(api_key_id=key_id, day=day, training_run_id=run_id,
                           training_tokens=0, training_tokens_reserved=0, prefill_tokens=0,
                           sampled_tokens=0, sampled_tokens_reserved=0)
        session.add(row)
        session.flush()
    return row


def record_reservation(session: Session, res: Reservation) -> None:
    if not (res.training_tokens or res.sampled_tokens):
        return
    row = _counter(session, res.api_key_id, res.day, res.training_run_id)
    row.training_tokens_reserved += res.training_tokens
    row.sampled_tokens_reserved += res.sampled_tokens
    session.flush()


def record_used(session: Session, key_id: str, day: str, run_id: str,
                used: dict[str, int]) -> None:
    """Charge work done on the spot (nothing was reserved for it)."""
    if not any(used.values()):
        return
    row = _counter(session, key_id, day, run_id)
    for name in TOKEN_FIELDS:
        setattr(row, name, getattr(row, name) + int(used.get(name, 0)))
    session.flush()


def settle(session: Session, reservation: str | None, used: dict[str, int] | None) -> None:
    """Release what a finished future reserved and charge what it used (nothing when it
    failed: `used` is None). Charged to the day it was admitted on."""
    if not reservation:
        return
    res = Reservation.from_json(reservation)
    if not (res.training_tokens or res.sampled_tokens or used):
        return
    row = _counter(session, res.api_key_id, res.day, res.training_run_id)
    row.training_tokens_reserved = max(0, row.training_tokens_reserved - res.training_tokens)
    row.sampled_tokens_reserved = max(0, row.sampled_tokens_reserved - res.sampled_tokens)
    for name in TOKEN_FIELDS:
        setattr(row, name, getattr(row, name) + int((used or {}).get(name, 0)))
    session.flush()


def day_totals(session: Session, key_id: str, day: str) -> dict[str, int]:
    """Used and reserved tokens of one key on one day, over all its runs."""
    c = UsageCounter
    row = session.execute(
        select(func.coalesce(func.sum(c.training_tokens), 0),
               func.coalesce(func.sum(c.training_tokens_reserved), 0),
               func.coalesce(func.sum(c.sampled_tokens), 0),
               func.coalesce(func.sum(c.sampled_tokens_reserved), 0))
        .where(c.api_key_id == key_id, c.day == day)).one()
    return {"training_tokens": int(row[0]), "training_tokens_reserved": int(row[1]),
            "sampled_tokens": int(row[2]), "sampled_tokens_reserved": int(row[3])}


def _report(ids: list[str], tokens: Sequence[Any],
            stored: Sequence[Any]) -> dict[str, dict[str, int]]:
    """Rows of (id, *token sums) and (id, checkpoint count, bytes) → one dict per id."""
    result = {i: {**dict.fromkeys(TOKEN_FIELDS, 0), "checkpoints": 0, "checkpoint_bytes": 0}
              for i in ids}
    for row in tokens:
        result[row[0]].update(zip(TOKEN_FIELDS, map(int, row[1:]), strict=True))
    for owner, count, size in stored:
        result[owner].update(checkpoints=int(count), checkpoint_bytes=int(size))
    return result


def _token_sums(group: Any) -> Any:
    return select(group, *(func.coalesce(func.sum(getattr(UsageCounter, f)), 0)
                           for f in TOKEN_FIELDS)).group_by(group)


def _checkpoint_sums(group: Any) -> Any:
    return (select(group, func.count(Checkpoint.id),
                   func.coalesce(func.sum(Checkpoint.size_bytes), 0))
            .join(TrainingRun, TrainingRun.id == Checkpoint.training_run_id).group_by(group))


def usage_by_key(session: Session, key_ids: list[str]) -> dict[str, dict[str, int]]:
    """All-time token usage and stored checkpoints (count, bytes) per key."""
    tokens = session.execute(_token_sums(UsageCounter.api_key_id)
                             .where(UsageCounter.api_key_id.in_(key_ids))).all()
    stored = session.execute(_checkpoint_sums(TrainingRun.api_key_id)
                             .where(TrainingRun.api_key_id.in_(key_ids))).all()
    return _report(key_ids, tokens, stored)


def usage_by_run(session: Session, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """All-time token usage (training, and sampling its checkpoints) and stored
    checkpoints (count, bytes) per training run."""
    tokens = session.execute(_token_sums(UsageCounter.training_run_id)
                             .where(UsageCounter.training_run_id.in_(run_ids))).all()
    stored = session.execute(_checkpoint_sums(Checkpoint.training_run_id)
                             .where(Checkpoint.training_run_id.in_(run_ids))).all()
    return _report(run_ids, tokens, stored)
