"""What the console's pages read: audit searches, the trail's verification against its
anchors, inclusion proofs, access requests, overrides, runs and release reports.

Owns the read queries behind the pages and the small view objects the templates show.
Verification and proofs are the CLI's own (audit.log.verify, audit.merkle through
gateway.cli_audit.check_proof), against the deployment's checkpoints, HMAC keys and
signing key. Must not change anything: every function here only reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from audit import anchors, merkle, query
from audit import log as audit_log
from audit.anchors import AnchorError, TreeHead
from audit.models import (
    AccessRequest,
    AuditEntry,
    Principal,
    ReleaseOverride,
    ReleaseReport,
    ReleaseRequest,
    TrainingRun,
)
from audit.query import AuditFilter
from gateway.cli_audit import check_proof
from gateway.errors import BadRequest, NotFound
from gateway.state import AppState
from policy import access, keys

AUDIT_PAGE = 50
LIST_PAGE = 25


# -- the audit trail --------------------------------------------------------------------

@dataclass(frozen=True)
class AuditSearch:
    """The search form: an action (event type, or a prefix ending in `*`), an actor
    (principal name or id), a time range, free text (subject and payload) and a cursor
    (entries before this seq; newest first)."""

    action: str = ""
    actor: str = ""
    since: str = ""
    until: str = ""
    text: str = ""
    before_seq: int | None = None

    def query_string(self, **changes: Any) -> dict[str, str]:
        values = {**self.__dict__, **changes}
        return {k: str(v) for k, v in values.items() if v not in (None, "")}


def parse_search(params: dict[str, str]) -> AuditSearch:
    before = params.get("before_seq", "").strip()
    if before and not before.isdigit():
        raise BadRequest("before_seq must be a positive whole number")
    search = AuditSearch(action=params.get("action", "").strip()[:80],
                         actor=params.get("actor", "").strip()[:200],
                         since=params.get("since", "").strip(),
                         until=params.get("until", "").strip(),
                         text=params.get("text", "").strip()[:200],
                         before_seq=int(before) if before else None)
    for name in ("since", "until"):
        try:
            query.normalize_time(getattr(search, name) or "1970-01-01")
        except ValueError as exc:
            raise BadRequest(f"{name}: {exc}") from exc
    return search


def _actor_id(session: Session, actor: str) -> str | None:
    if not actor:
        return None
    principal = keys.find_principal(session, actor)
    return principal.id if principal is not None else actor


def _search_statement(session: Session, search: AuditSearch) -> Any:
    exact = search.action and not search.action.endswith("*")
    flt = AuditFilter(actor=_actor_id(session, search.actor),
                      event_types=(search.action,) if exact else (),
                      since=search.since or None, until=search.until or None)
    stmt = flt.apply(select(*audit_log.COLUMNS))
    if search.action and not exact:
        stmt = stmt.where(AuditEntry.event_type.startswith(search.action[:-1], autoescape=True))
    if search.text:
        stmt = stmt.where(or_(AuditEntry.subject.icontains(search.text, autoescape=True),
                              AuditEntry.payload.icontains(search.text, autoescape=True)))
    if search.before_seq is not None:
        stmt = stmt.where(AuditEntry.seq < search.before_seq)
    return stmt


def find_entries(session: Session, search: AuditSearch) -> tuple[list[dict[str, Any]],
                                                                 int | None]:
    """One page, newest first, and the cursor of the next (older) page if there is one."""
    stmt = _search_statement(session, search).order_by(AuditEntry.seq.desc())
    rows = session.execute(stmt.limit(AUDIT_PAGE + 1)).all()
    entries = [query.entry_view(r) for r in rows[:AUDIT_PAGE]]
    more = len(rows) > AUDIT_PAGE
    return entries, entries[-1]["seq"] if more else None


def names_of(session: Session, ids: set[str]) -> dict[str, str]:
    """Principal names for the ids shown on a page (other actors keep their id)."""
    if not ids:
        return {}
    rows = session.execute(select(Principal.id, Principal.name).where(Principal.id.in_(ids)))
    return {pid: name for pid, name in rows}


@dataclass
class TrailStatus:
    """The chain walked end to end against the checkpoints on disk, and those anchors."""

    chain: audit_log.VerifyResult
    checkpoints: int
    latest: TreeHead | None
    signature: str  # "valid", "INVALID", "unsigned", "no signing key configured"
    problem: str | None = None  # the checkpoints could not be read


def _checkpoints(state: AppState) -> tuple[list[TreeHead], str | None]:
    try:
        return anchors.read_checkpoints(state.settings.checkpoint_dir), None
    except AnchorError as exc:
        return [], str(exc)


def _signature(state: AppState, head: TreeHead | None) -> str:
    key = state.checkpoints.signing_key
    if head is None:
        return "no checkpoint yet"
    if key is None:
        return "no signing key configured"
    if not head.signature:
        return "unsigned"
    return "valid" if head.signature_ok(key.public_key()) else "INVALID"


def trail_status(session: Session, state: AppState) -> TrailStatus:
    """As `loragate audit verify` with the deployment's anchors: the checkpoints are read
    first, so every entry they vouch for is committed before the walk reads the log."""
    heads, problem = _checkpoints(state)
    key = state.checkpoints.signing_key
    chain = audit_log.verify(session, keys=state.settings.hmac_keys(), checkpoints=heads,
                             public_key=key.public_key() if key is not None else None)
    latest = heads[-1] if heads else None
    return TrailStatus(chain=chain, checkpoints=len(heads), latest=latest,
                       signature=_signature(state, latest), problem=problem)


@dataclass
class ProofView:
    """An entry's inclusion proof against the newest checkpoint that covers it."""

    seq: int
    checkpoint: TreeHead | None = None
    proof: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # None: the proof verifies
    signature: str = ""
    covered_up_to: int = 0

    @property
    def verified(self) -> bool:
        return self.checkpoint is not None and self.problem is None

    @property
    def proof_json(self) -> str:
        return json.dumps(self.proof, indent=2)


def inclusion(session: Session, state: AppState, seq: int) -> ProofView:
    found = query.find(session, AuditFilter(after_seq=seq - 1), limit=1)
    if not found or found[0]["seq"] != seq:
        raise NotFound(f"audit entry {seq} not found")
    entry = found[0]
    heads, _ = _checkpoints(state)
    covering = [h for h in heads if h.seq >= seq]
    if not covering:
        return ProofView(seq=seq, covered_up_to=heads[-1].seq if heads else 0)
    head = covering[-1]
    path = merkle.inclusion_proof(audit_log.entry_hashes(session, head.seq), seq - 1)
    proof = {"type": "inclusion", "entry": entry, "tree_size": head.seq,
             "merkle_root": head.merkle_root, "proof": [p.hex() for p in path]}
    return ProofView(seq=seq, checkpoint=head, proof=proof, problem=check_proof(proof, head),
                     signature=_signature(state, head), covered_up_to=head.seq)


# -- requests waiting for a decision -------------------------------------------------------

def access_requests(session: Session, status: str) -> list[dict[str, Any]]:
    return [{"row": r, "base_models": json.loads(r.wanted_base_models or "[]")}
            for r in access.list_requests(session, status or None)]


def overrides(session: Session, status: str) -> list[ReleaseOverride]:
    stmt = select(ReleaseOverride).order_by(ReleaseOverride.requested_at.desc())
    if status:
        stmt = stmt.where(ReleaseOverride.status == status)
    return list(session.scalars(stmt.limit(200)))


def pending_counts(session: Session) -> dict[str, int]:
    def count(model: Any, column: Any) -> int:
        return session.scalar(select(func.count()).select_from(model)
                              .where(column == "pending")) or 0
    return {"access": count(AccessRequest, AccessRequest.status),
            "overrides": count(ReleaseOverride, ReleaseOverride.status)}


# -- runs and releases -----------------------------------------------------------------------

def _owned_by(stmt: Any, model: Any, owner: str | None) -> Any:
    return stmt if owner is None else stmt.where(model.principal_id == owner)


def runs(session: Session, owner: str | None, offset: int) -> tuple[list[Any], int]:
    """A page of training runs (newest first) with their owners' names; `owner` None
    means everyone's (the caller reads all records)."""
    stmt = _owned_by(select(TrainingRun, Principal.name)
                     .join(Principal, Principal.id == TrainingRun.principal_id),
                     TrainingRun, owner)
    total = session.scalar(select(func.count()).select_from(
        _owned_by(select(TrainingRun.id), TrainingRun, owner).subquery())) or 0
    rows = session.execute(stmt.order_by(TrainingRun.created_at.desc())
                           .limit(LIST_PAGE).offset(offset)).all()
    return list(rows), total


def releases(session: Session, owner: str | None, offset: int) -> tuple[list[Any], int]:
    stmt = _owned_by(select(ReleaseRequest), ReleaseRequest, owner)
    total = session.scalar(select(func.count()).select_from(
        _owned_by(select(ReleaseRequest.id), ReleaseRequest, owner).subquery())) or 0
    rows = session.scalars(stmt.order_by(ReleaseRequest.created_at.desc())
                           .limit(LIST_PAGE).offset(offset)).all()
    return list(rows), total


@dataclass
class ReportView:
    release: ReleaseRequest
    report: dict[str, Any] | None
    sha256: str | None

    @property
    def suites(self) -> list[dict[str, Any]]:
        return list((self.report or {}).get("suites", []))


def release_report(session: Session, release_id: str, owner: str | None) -> ReportView:
    row = session.get(ReleaseRequest, release_id)
    if row is None or (owner is not None and row.principal_id != owner):
        raise NotFound(f"release {release_id} not found")
    stored = session.get(ReleaseReport, row.report_id) if row.report_id else None
    if stored is None:
        return ReportView(release=row, report=None, sha256=None)
    return ReportView(release=row, report=json.loads(stored.report),
                      sha256=stored.report_sha256)
