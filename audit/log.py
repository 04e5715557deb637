"""The append-only, hash-chained audit log: one code path to append, one to verify.

Each entry's hash covers a canonical encoding of its content and the previous entry's
hash, so modifying, deleting or reordering rows breaks the chain at a named `seq`.
Appends run inside the caller's transaction (the audit row commits with the state change
it records) and are serialized: SQLite holds the write lock from BEGIN IMMEDIATE,
PostgreSQL takes a transaction-scoped advisory lock before reading the head.

Must not import other loragate packages; payloads must never carry secrets or raw
training/sampled text (callers pass ids, hashes and decisions).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from audit.models import AuditEntry

GENESIS_HASH = "0" * 64
HASH_VERSION = 1
_HASH_DOMAIN = b"loragate-audit/v1\x00"
# Arbitrary constant identifying the audit-append lock among PostgreSQL advisory locks.
PG_ADVISORY_LOCK_KEY = 0x10_6A_7E_A0


def canonical_json(value: Any) -> str:
    """The one JSON encoding that is hashed and stored verbatim."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def timestamp_now() -> str:
    """RFC 3339 UTC with microseconds; stored as text exactly as hashed."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compute_entry_hash(
    *,
    seq: int,
    created_at: str,
    actor: str,
    event_type: str,
    subject: str,
    decision: str,
    request_id: str,
    payload: str,
    prev_hash: str,
) -> str:
    fields = [seq, created_at, actor, event_type, subject, decision, request_id, payload,
              prev_hash]
    return hashlib.sha256(_HASH_DOMAIN + canonical_json(fields).encode("utf-8")).hexdigest()


def _lock_head(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_ADVISORY_LOCK_KEY})
    # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE, audit.db).


def append(
    session: Session,
    *,
    actor: str,
    event_type: str,
    decision: str,
    subject: str = "",
    request_id: str = "",
    payload: dict[str, Any] | None = None,
) -> AuditEntry:
    """Append one entry in the caller's transaction and return it (flushed)."""
    _lock_head(session)
    head = session.execute(
        select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    entry = AuditEntry(
        seq=seq,
        created_at=timestamp_now(),
        actor=actor,
        event_type=event_type,
        subject=subject,
        decision=decision,
        request_id=request_id,
        payload=canonical_json(payload or {}),
        prev_hash=prev_hash,
        hash_version=HASH_VERSION,
    )
    entry.entry_hash = _hash_of(entry)
    session.add(entry)
    session.flush()
    return entry


def _hash_of(entry: AuditEntry) -> str:
    return compute_entry_hash(
        seq=entry.seq,
        created_at=entry.created_at,
        actor=entry.actor,
        event_type=entry.event_type,
        subject=entry.subject,
        decision=entry.decision,
        request_id=entry.request_id,
        payload=entry.payload,
        prev_hash=entry.prev_hash,
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    bad_seq: int | None = None
    reason: str | None = None

    def describe(self) -> str:
        if self.ok:
            return f"audit chain OK: {self.rows} entries, head seq {self.head_seq} {self.head_hash}"
        return f"audit chain BROKEN at seq {self.bad_seq}: {self.reason}"


def _stream(session: Session, batch: int = 5000) -> Iterator[AuditEntry]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEntry).where(AuditEntry.seq > last).order_by(AuditEntry.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def verify(session: Session) -> VerifyResult:
    """Walk the chain from seq 1; report the first entry that does not hold."""
    expected_seq, prev_hash, rows = 1, GENESIS_HASH, 0
    for entry in _stream(session):
        problem = _check_entry(entry, expected_seq, prev_hash)
        if problem:
            return VerifyResult(False, rows, expected_seq - 1, prev_hash, problem[0], problem[1])
        rows += 1
        expected_seq, prev_hash = entry.seq + 1, entry.entry_hash
    return VerifyResult(True, rows, expected_seq - 1, prev_hash)


def _check_entry(entry: AuditEntry, expected_seq: int, prev_hash: str) -> tuple[int, str] | None:
    if entry.seq != expected_seq:
        return expected_seq, f"missing entry: expected seq {expected_seq}, found {entry.seq}"
    if entry.hash_version != HASH_VERSION:
        return entry.seq, f"unknown hash version {entry.hash_version}"
    if entry.prev_hash != prev_hash:
        return entry.seq, "prev_hash does not match the previous entry (reordered or forked)"
    if _hash_of(entry) != entry.entry_hash:
        return entry.seq, "content does not match entry_hash (modified)"
    return None
