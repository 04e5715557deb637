"""Payload retention: the raw text in the futures table does not live forever.

A future's `request_payload` holds what the caller sent (training tokens, prompts) and its
`result_payload` what came back (logprobs, sampled tokens). Both are purged once the
owner has been sent the result (`purge_delivered`, which the gateway runs after the
retrieve's response has gone out) or, for a result never retrieved, once it finished
longer ago than the retention (`purge_expired`, run periodically by the API server and by
`loragate futures purge`). The row stays — status, kind, ids, error message, quota
settlement — with the request payload emptied, the result NULL, `request_format` set to
`"purged"` and `result_format` saying why (`"delivered"` or `"expired"`). Each purge
batch appends one `futures.purged` audit row before the payloads go, in the same
transaction, listing every purged future's id, kind and the SHA-256 of its request and
result payloads (the request's equals the `content_sha256` its admission recorded).
Pending and running futures are never purged.

Must not import other loragate packages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import Future, utcnow

PURGED = "purged"  # request_format of a purged future
DELIVERED, EXPIRED = "delivered", "expired"  # its result_format: why it was purged
FINISHED = ("done", "failed")
PURGE_BATCH = 200
DEFAULT_RETENTION_DAYS = 7.0


def is_purged(fut: Future) -> bool:
    return fut.request_format == PURGED


def why_purged(result_format: str | None, retention_days: float) -> str:
    """What happened to a purged future's payloads, for the caller who asks for them."""
    if result_format == DELIVERED:
        return "was delivered to its owner and then purged"
    return (f"was not retrieved within the retention of {retention_days:g} days and was "
            "purged")


def purge_delivered(factory: sessionmaker[Session], request_id: str, *, actor: str) -> bool:
    """Purge the payloads of a finished future whose result was just sent to its owner;
    False when there was nothing to purge (not finished, or purged already)."""
    with transaction(factory) as session:
        fut = session.scalars(_purgeable().where(Future.request_id == request_id)
                              .with_for_update()).first()
        if fut is None:
            return False
        _purge(session, [fut], DELIVERED, actor=actor, subject=request_id,
               request_id=request_id, details={"reason": DELIVERED})
    return True


def purge_expired(factory: sessionmaker[Session], *, retention_days: float, actor: str,
                  now: dt.datetime | None = None) -> list[str]:
    """Purge up to PURGE_BATCH finished futures that finished longer than `retention_days`
    ago without being retrieved; return their request ids. Concurrent purgers skip each
    other's rows."""
    cutoff = (now or utcnow()) - dt.timedelta(days=retention_days)
    finished = func.coalesce(Future.finished_at, Future.created_at)
    with transaction(factory) as session:
        rows = session.scalars(_purgeable().where(finished <= cutoff)
                               .order_by(finished, Future.request_id).limit(PURGE_BATCH)
                               .with_for_update(skip_locked=True)).all()
        if rows:
            _purge(session, rows, EXPIRED, actor=actor, subject=f"{len(rows)} futures",
                   details={"reason": "retention", "retention_days": retention_days})
        return [fut.request_id for fut in rows]


def purge_all_expired(factory: sessionmaker[Session], *, retention_days: float, actor: str,
                      now: dt.datetime | None = None) -> list[str]:
    """`purge_expired` batch after batch until none is left; all the ids purged."""
    purged: list[str] = []
    while True:
        batch = purge_expired(factory, retention_days=retention_days, actor=actor, now=now)
        purged += batch
        if len(batch) < PURGE_BATCH:
            return purged


def _purgeable() -> Any:
    return select(Future).where(Future.status.in_(FINISHED), Future.request_format != PURGED)


def _purge(session: Session, futures: Sequence[Future], why: str, *, actor: str,
           subject: str, details: dict[str, Any], request_id: str = "") -> None:
    """The audit row listing the payloads' digests first, then the payloads go."""
    listed = [{"request_id": fut.request_id, "kind": fut.kind,
               "request_sha256": _sha256(fut.request_payload),
               "result_sha256": _sha256(fut.result_payload)} for fut in futures]
    audit_log.append(session, actor=actor, event_type="futures.purged", decision="purge",
                     subject=subject, request_id=request_id,
                     payload={**details, "futures": listed})
    session.execute(update(Future)
                    .where(Future.request_id.in_([fut.request_id for fut in futures]))
                    .values(request_payload=b"", result_payload=None, request_format=PURGED,
                            result_format=why)
                    .execution_options(synchronize_session=False))


def _sha256(payload: bytes | None) -> str | None:
    return hashlib.sha256(payload).hexdigest() if payload is not None else None
