"""Finding entries in the audit log, and exporting them so they verify offline.

Filters: actor (principal id), API key id, training run, event type, decision, time range
and a seq cursor. An exported entry carries every hashed field exactly as stored (the
payload as its canonical JSON text) plus the hashes and MAC, so `verify_export` can
recompute each entry hash, and the chain links between consecutive entries, without
the database. Must not import other loragate packages than audit.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import AuditEntry

MAX_PAGE = 1000
EXPORT_FIELDS = audit_log.FIELDS


def normalize_time(value: str) -> str:
    """An ISO 8601 date or time → the log's fixed-width RFC 3339 UTC text, so comparing
    text compares times. Raises ValueError saying what is expected."""
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an ISO 8601 date or time, e.g. "
                         "2026-11-21T12:00:00Z") from exc
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    api_key_id: str | None = None
    training_run: str | None = None
    event_types: tuple[str, ...] = ()
    decision: str | None = None
    since: str | None = None  # RFC 3339 UTC, inclusive
    until: str | None = None  # RFC 3339 UTC, exclusive
    after_seq: int = 0

    def apply(self, stmt: Any) -> Any:
        e = AuditEntry
        stmt = stmt.where(e.seq > self.after_seq)
        if self.actor:
            stmt = stmt.where(e.actor == self.actor)
        if self.api_key_id:
            # Payloads are canonical JSON, so the key id appears in exactly this form.
            stmt = stmt.where(e.payload.contains(
                audit_log.canonical_json({"api_key_id": self.api_key_id})[1:-1]))
        if self.training_run:
            run = self.training_run
            stmt = stmt.where(or_(e.subject == run, e.subject.startswith(f"{run}/"),
                                  e.subject.startswith(f"tinker://{run}/")))
        if self.event_types:
            stmt = stmt.where(e.event_type.in_(self.event_types))
        if self.decision:
            stmt = stmt.where(e.decision == self.decision)
        # created_at is fixed-width RFC 3339 text, so text order is time order.
        if self.since:
            stmt = stmt.where(e.created_at >= normalize_time(self.since))
        if self.until:
            stmt = stmt.where(e.created_at < normalize_time(self.until))
        return stmt


def entry_view(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in EXPORT_FIELDS}


def find(session: Session, flt: AuditFilter, limit: int = 100) -> list[dict[str, Any]]:
    """One page of matching entries by seq; page on with after_seq = the last seq."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be 1..{MAX_PAGE}")
    stmt = flt.apply(select(*audit_log.COLUMNS)).order_by(AuditEntry.seq).limit(limit)
    return [entry_view(r) for r in session.execute(stmt).all()]


def export_entries(session: Session, flt: AuditFilter) -> Iterator[dict[str, Any]]:
    """Every matching entry, by seq, read a page at a time."""
    cursor = flt.after_seq
    while True:
        page = find(session, replace(flt, after_seq=cursor), limit=MAX_PAGE)
        if not page:
            return
        yield from page
        cursor = page[-1]["seq"]


def export(session: Session, flt: AuditFilter) -> Iterator[str]:
    """Every matching entry as one JSON line (JSONL), streamed."""
    for entry in export_entries(session, flt):
        yield json.dumps(entry, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class ExportCheck:
    ok: bool
    entries: int
    first_seq: int | None
    last_seq: int | None
    linked: int  # consecutive pairs whose prev_hash link was checked
    bad_seq: int | None = None
    reason: str | None = None


def verify_export(lines: Iterable[str]) -> ExportCheck:
    """Offline: every entry's hash recomputes from its fields, and consecutive seqs link."""
    count, linked, first, prev = 0, 0, None, None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
            entry_hash = audit_log.entry_hash_of(e)
        except (ValueError, KeyError, TypeError):
            return ExportCheck(False, count, first, prev and prev["seq"], linked,
                               reason=f"line {number} is not an exported audit entry")
        if entry_hash != e["entry_hash"]:
            return ExportCheck(False, count, first, prev and prev["seq"], linked, e["seq"],
                               "content does not match entry_hash (modified)")
        if prev is not None and e["seq"] == prev["seq"] + 1:
            if e["prev_hash"] != prev["entry_hash"]:
                return ExportCheck(False, count, first, prev["seq"], linked, e["seq"],
                                   "prev_hash does not match the previous entry")
            linked += 1
        elif prev is not None and e["seq"] <= prev["seq"]:
            return ExportCheck(False, count, first, prev["seq"], linked, e["seq"],
                               "entries are out of order")
        first = e["seq"] if first is None else first
        count, prev = count + 1, e
    return ExportCheck(True, count, first, prev and prev["seq"], linked)
