"""The append-only, hash-chained audit log: one code path to append, one to verify.

Each entry's hash covers a canonical encoding of its content and the previous entry's
hash, so modifying, deleting or reordering rows breaks the chain at a named `seq`.
Appends run inside the caller's transaction (the audit row commits with the state change
it records) and are serialized: SQLite holds the write lock from BEGIN IMMEDIATE,
PostgreSQL takes a transaction-scoped advisory lock before reading the head. When the
session factory carries HMAC keys (`session.info["audit_hmac"]`, see audit.db), each new
entry also gets a MAC. Verification also checks MACs and external checkpoints
(audit.anchors), which catch what a chain alone cannot: a truncated tail and a chain
recomputed by someone with write access.

Every entry fits its columns on every database: a text longer than its column keeps a
prefix plus the SHA-256 of the whole, and NUL characters (which PostgreSQL refuses in
text) and lone surrogates are escaped, so a refusal with a long path or id still leaves
its row.

Must not import other loragate packages; payloads must never carry secrets or raw
training/sampled text (callers pass ids, hashes and decisions).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy import String, Table, insert, select, text
from sqlalchemy.orm import Session

from audit import metrics
from audit.anchors import HMAC_INFO_KEY, HmacKeys, TreeHead, save_checkpoint
from audit.merkle import RootBuilder
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
    return _digest([seq, created_at, actor, event_type, subject, decision, request_id, payload,
                    prev_hash])


def _digest(fields: list[Any]) -> str:
    return hashlib.sha256(_HASH_DOMAIN + canonical_json(fields).encode("utf-8")).hexdigest()


def _lock_head(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_ADVISORY_LOCK_KEY})
    # SQLite: the transaction already holds the write lock (BEGIN IMMEDIATE, audit.db).


# The text columns a caller fills, and their lengths (the Alembic schema's).
_FITTED: dict[str, int] = {
    name: cast(String, AuditEntry.__table__.c[name].type).length or 0
    for name in ("actor", "event_type", "subject", "decision", "request_id")}
_DIGEST_MARK = "…sha256:"


def storable(value: str) -> str:
    """Text every database stores as given: NUL characters (PostgreSQL refuses them) and
    lone surrogates (not UTF-8) escaped."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def fit(value: str, length: int) -> str:
    """`value` as stored in a column of `length` characters (see `storable`); when too
    long, a prefix plus the SHA-256 of the whole (the bare digest, cut to the column, when
    the column cannot hold a prefix too)."""
    value = storable(value)
    if len(value) <= length:
        return value
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()
    keep = length - len(_DIGEST_MARK) - len(digest)
    return value[:keep] + _DIGEST_MARK + digest if keep > 0 else digest[:length]


_HEAD = select(AuditEntry.seq, AuditEntry.entry_hash).order_by(AuditEntry.seq.desc()).limit(1)
_INSERT = insert(cast(Table, AuditEntry.__table__))


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
    """Append one entry in the caller's transaction and return it (written, detached).

    Runs on the session's connection with Core statements: the ORM's unit of work would
    cost more than the rest of the append, and entries are never changed afterwards.
    Timed, and counted when it raises (audit.metrics)."""
    with metrics.timed_append():
        return _write_entry(session, actor=actor, event_type=event_type, decision=decision,
                            subject=subject, request_id=request_id, payload=payload)


def _write_entry(session: Session, *, actor: str, event_type: str, decision: str,
                 subject: str, request_id: str, payload: dict[str, Any] | None
                 ) -> AuditEntry:
    conn = session.connection()
    _lock_head(session)
    head = conn.execute(_HEAD).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS_HASH)
    fields = {"actor": actor, "event_type": event_type, "subject": subject,
              "decision": decision, "request_id": request_id}
    values: dict[str, Any] = {
        "seq": seq, "created_at": timestamp_now(),
        **{name: fit(value, _FITTED[name]) for name, value in fields.items()},
        "payload": storable(canonical_json(payload or {})), "prev_hash": prev_hash,
    }
    values["entry_hash"] = compute_entry_hash(**values)
    keys: HmacKeys | None = session.info.get(HMAC_INFO_KEY)
    values["mac"], values["key_id"] = keys.mac(values["entry_hash"]) if keys else (None, None)
    values["hash_version"] = HASH_VERSION
    conn.execute(_INSERT, values)
    return AuditEntry(**values)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows: int
    head_seq: int
    head_hash: str
    merkle_root: str = ""
    bad_seq: int | None = None
    reason: str | None = None
    checkpoints: int = 0
    macs: int = 0

    def describe(self) -> str:
        if self.ok:
            return (f"audit chain OK: {self.rows} entries, head seq {self.head_seq} "
                    f"{self.head_hash}, Merkle root {self.merkle_root}; {self.macs} MACs and "
                    f"{self.checkpoints} checkpoints checked")
        return f"audit chain BROKEN at seq {self.bad_seq}: {self.reason}"


COLUMNS = (AuditEntry.seq, AuditEntry.created_at, AuditEntry.actor, AuditEntry.event_type,
           AuditEntry.subject, AuditEntry.decision, AuditEntry.request_id, AuditEntry.payload,
           AuditEntry.prev_hash, AuditEntry.entry_hash, AuditEntry.mac, AuditEntry.key_id,
           AuditEntry.hash_version)


def stream_rows(session: Session, columns: Sequence[Any] = COLUMNS, *, upto: int | None = None,
                batch: int = 10_000) -> Iterator[Any]:
    """Rows as tuples of `columns` (seq first), by seq, in batches: constant memory."""
    last = 0
    while True:
        stmt = select(*columns).where(AuditEntry.seq > last)
        if upto is not None:
            stmt = stmt.where(AuditEntry.seq <= upto)
        rows = session.execute(stmt.order_by(AuditEntry.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1][0]


HASH_COLUMNS = (AuditEntry.seq, AuditEntry.entry_hash)


# The hashed fields lead COLUMNS, in hash order.
HASHED_FIELDS = tuple(c.key for c in COLUMNS[:9])
FIELDS = tuple(c.key for c in COLUMNS)


def _row_hash(row: Any) -> str:
    return _digest(list(row[:9]))


def entry_hash_of(entry: Mapping[str, Any]) -> str:
    """The entry hash recomputed from an entry's fields (an exported line, a proof)."""
    return _digest([entry[name] for name in HASHED_FIELDS])


class _Verifier:
    """One pass over the log: the chain, MACs and checkpoints, first failure wins."""

    def __init__(self, keys: HmacKeys | None, checkpoints: Sequence[TreeHead]) -> None:
        self.keys = keys
        self.pending = sorted(checkpoints, key=lambda c: c.seq)
        self.tree = RootBuilder()
        self.expected_seq, self.prev_hash, self.rows, self.macs = 1, GENESIS_HASH, 0, 0

    def check(self, row: Any) -> tuple[int, str] | None:
        seq, prev_hash, entry_hash = row[0], row[8], row[9]
        if seq != self.expected_seq:
            return self.expected_seq, (f"missing entry: expected seq {self.expected_seq}, "
                                       f"found {seq} (rows deleted)")
        if row[12] != HASH_VERSION:
            return seq, f"unknown hash version {row[12]}"
        if prev_hash != self.prev_hash:
            return seq, "prev_hash does not match the previous entry (rows reordered or forked)"
        if _row_hash(row) != entry_hash:
            return seq, "content does not match entry_hash (modified)"
        problem = self._check_mac(row)
        if problem:
            return seq, problem
        self.tree.add(bytes.fromhex(entry_hash))
        self.rows += 1
        self.expected_seq, self.prev_hash = seq + 1, entry_hash
        return self._check_checkpoints(seq, entry_hash)

    def _check_mac(self, row: Any) -> str | None:
        if self.keys is None:
            return None
        why = self.keys.check(row[11], row[9], row[10])
        if why is None:
            self.macs += 1
            return None
        if why == "no MAC" and self.macs == 0:
            return None  # entries from before HMAC was switched on
        return f"{why}: the chain was recomputed without the HMAC key, or MACs were stripped"

    def _check_checkpoints(self, seq: int, entry_hash: str) -> tuple[int, str] | None:
        while self.pending and self.pending[0].seq == seq:
            cp = self.pending.pop(0)
            if cp.entry_hash != entry_hash or cp.merkle_root != self.tree.root().hex():
                return seq, (f"does not match the checkpoint of {cp.created_at}: the log up to "
                             "here was rewritten and its chain recomputed")
        return None

    def finish(self) -> tuple[int, str] | None:
        if self.keys is not None and self.rows and self.macs == 0:
            return 1, ("no entry carries a valid MAC although HMAC keys were given: the chain "
                       "was recomputed or the MACs stripped")
        if self.pending:
            cp = self.pending[0]
            return self.expected_seq, (f"truncated tail: the checkpoint of {cp.created_at} "
                                       f"vouches for seq {cp.seq}, but the log ends at seq "
                                       f"{self.expected_seq - 1}")
        return None


def verify(session: Session, *, keys: HmacKeys | None = None,
           checkpoints: Sequence[TreeHead] = (),
           public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """Walk the log from seq 1 and report the first entry that does not hold: against
    its own chain, against `keys` (MACs) and against external `checkpoints` (whose
    signatures must verify with `public_key` when one is given)."""
    if public_key is not None:
        for cp in checkpoints:
            if not cp.signature_ok(public_key):
                return VerifyResult(False, 0, 0, "", bad_seq=cp.seq,
                                    reason=f"the checkpoint of {cp.created_at} for seq {cp.seq} "
                                    "has no valid signature for this public key")
    v = _Verifier(keys, checkpoints)
    for row in stream_rows(session):
        problem = v.check(row)
        if problem:
            break
    else:
        problem = v.finish()
    head = v.expected_seq - 1
    if problem:
        return VerifyResult(False, v.rows, head, v.prev_hash, bad_seq=problem[0],
                            reason=problem[1])
    return VerifyResult(True, v.rows, head, v.prev_hash, merkle_root=v.tree.root().hex(),
                        checkpoints=len(checkpoints), macs=v.macs)


def make_checkpoint(session: Session, reason: str,
                    signing_key: Ed25519PrivateKey | None = None) -> TreeHead | None:
    """A (signed) checkpoint of the current head, or None for an empty log."""
    tree, head, head_hash = RootBuilder(), 0, GENESIS_HASH
    for seq, entry_hash in stream_rows(session, HASH_COLUMNS, batch=50_000):
        tree.add(bytes.fromhex(entry_hash))
        head, head_hash = seq, entry_hash
    if head == 0:
        return None
    ckpt = TreeHead(seq=head, entry_hash=head_hash, merkle_root=tree.root().hex(),
                      created_at=timestamp_now(), reason=reason)
    return ckpt.signed(signing_key) if signing_key is not None else ckpt


def entry_hashes(session: Session, upto: int) -> list[bytes]:
    """The raw entry hashes of seq 1..upto (the Merkle leaves), for proofs."""
    return [bytes.fromhex(h) for _, h in stream_rows(session, HASH_COLUMNS, upto=upto,
                                                     batch=50_000)]


def write_checkpoint(session: Session, directory: Path, reason: str,
                     signing_key: Ed25519PrivateKey | None = None,
                     after_seq: int = 0) -> tuple[TreeHead, Path] | None:
    """Write a checkpoint of the head to `directory`; None when the log is empty or has
    not grown past `after_seq`."""
    ckpt = make_checkpoint(session, reason, signing_key)
    if ckpt is None or ckpt.seq <= after_seq:
        return None
    return ckpt, save_checkpoint(directory, ckpt)
