"""The two-person override of a quarantine, bound to content and to two real persons.

An admin requests it for a quarantined checkpoint with a reason; an independent second
person (an auditor by default policy) approves it with a reason, and that releases the
checkpoint (evals.release.transition) and lifts its lineage hold (policy.lineage).

- **Content**: the override is bound to the checkpoint's adapter SHA-256 and tinker path
  when it is requested. The approval finds the checkpoint by path and releases it only if
  it is the same row (ids are never reused), its recorded SHA-256 is the bound one and the
  adapter bytes on disk still hash to it. Deleting a checkpoint cancels its pending
  overrides (audited), so one re-created under the same name never inherits one.
- **Persons**: the approver must be independent of the requester (policy.persons): a
  different principal that the requesting admin did not enroll (nor approve, nor issue
  the approving key to), and not enrolled by the same admin. Neither half may come from
  a party to the weights: the checkpoint's owner (with the key that created its run) and
  whoever asked for its release or export, nor anyone linked to them the same way.
- **A live request**: the requester's half counts only while the key it was made with is
  usable (not revoked, not expired) and its principal still holds `releases,
  override_request`; revoking that key cancels the pending override (policy.keys).
- **Lineage**: a checkpoint whose weights descend from blocked weights is never released
  this way, nor one held by a quarantine upstream: that ancestor's own override comes
  first.

Must not import fastapi or gateway.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import (
    Checkpoint,
    Future,
    ReleaseOverride,
    ReleaseRequest,
    TrainingRun,
    utcnow,
)
from engine.checkpoints import ADAPTER_FILE
from evals.release import ReleaseRefused, transition
from policy import keys, lineage, persons
from policy.digest import file_sha256
from policy.errors import KeyRejected

MIN_REASON = 10
ACTION = "a release override"
# A policy decision: (principal id, role, resource, action) → allowed (policy.authz).
Allows = Callable[[str, str, str, str], bool]


def request_override(session: Session, ckpt: Checkpoint, *, principal_id: str,
                     key_id: str | None, reason: str, checkpoint_root: Path,
                     request_id: str = "") -> ReleaseOverride:
    """The first person's half: bound to the checkpoint's content as it is now."""
    if ckpt.release_state != "quarantined":
        raise ReleaseRefused(f"{ckpt.tinker_path} is {ckpt.release_state}; only quarantined "
                             "checkpoints need an override")
    _check_reason(reason)
    _check_not_party(session, ckpt, (principal_id, key_id))
    _check_lineage(session, ckpt)
    pending = _pending(session, ckpt)
    if pending:
        raise ReleaseRefused(f"override {pending[0].id} for {ckpt.tinker_path} is already "
                             "waiting for an auditor's approval")
    sha = _bound_sha256(ckpt, checkpoint_root)
    override = ReleaseOverride(id=f"ovr-{uuid.uuid4().hex[:20]}", checkpoint_id=ckpt.id,
                               tinker_path=ckpt.tinker_path, status="pending",
                               requested_by=principal_id, request_reason=reason,
                               adapter_sha256=sha, requested_key_id=key_id)
    session.add(override)
    audit_log.append(session, actor=principal_id, event_type="release.override_requested",
                     decision="pending", subject=ckpt.tinker_path, request_id=request_id,
                     payload={"override_id": override.id, "reason_sha256": _sha(reason),
                              "checkpoint_id": ckpt.id, "adapter_sha256": sha,
                              "api_key_id": key_id})
    session.flush()
    return override


def approve_override(session: Session, override: ReleaseOverride, *, principal_id: str,
                     key_id: str | None, reason: str, checkpoint_root: Path, allows: Allows,
                     request_id: str = "") -> Checkpoint:
    """The second person's half releases the checkpoint (both reasons audited) — only the
    content the override was bound to, only while the request still stands (`allows`:
    the policy decisions in force), and only from a person independent of the requester
    and of the weights' owner."""
    if override.status != "pending":
        raise ReleaseRefused(f"override {override.id} is {override.status}, not pending")
    persons.check_independent(session, first=(override.requested_by, override.requested_key_id),
                              second=(principal_id, key_id), action=ACTION)
    _check_request_stands(session, override, allows)
    _check_reason(reason)
    ckpt = _bound_checkpoint(session, override, checkpoint_root)
    _check_not_party(session, ckpt, (principal_id, key_id))
    _check_lineage(session, ckpt)
    override.status, override.approved_by, override.approve_reason = "approved", principal_id, \
        reason
    override.approved_key_id, override.decided_at = key_id, utcnow()
    audit_log.append(session, actor=principal_id, event_type="release.override_approved",
                     decision="released", subject=ckpt.tinker_path, request_id=request_id,
                     payload={"override_id": override.id, "requested_by": override.requested_by,
                              "requested_key_id": override.requested_key_id,
                              "approved_key_id": key_id,
                              "request_reason": override.request_reason,
                              "approve_reason": reason,
                              "adapter_sha256": override.adapter_sha256})
    transition(session, ckpt, "released", actor=principal_id, request_id=request_id,
               reason=f"two-person override {override.id}",
               adapter_sha256=override.adapter_sha256)
    lineage.lift(session, ckpt, override_id=override.id)
    return ckpt


def cancel_pending(session: Session, ckpt: Checkpoint, *, actor: str, reason: str,
                   request_id: str = "") -> list[str]:
    """Cancel the checkpoint's pending overrides (its weights are going away), each
    audited; returns their ids."""
    cancelled = []
    for override in _pending(session, ckpt):
        persons.cancel_override(session, override, actor=actor, reason=reason,
                                request_id=request_id)
        cancelled.append(override.id)
    session.flush()
    return cancelled


def _check_request_stands(session: Session, override: ReleaseOverride, allows: Allows
                          ) -> None:
    """The requester's half counts only while its key is usable and its principal may
    still request overrides."""
    if not override.requested_key_id:
        raise ReleaseRefused(f"override {override.id} names no API key it was requested with; "
                             "an admin requests a new one")
    try:
        principal, _ = keys.authenticate_key_id(session, override.requested_key_id)
    except KeyRejected as exc:
        raise ReleaseRefused(f"override {override.id} no longer stands: the API key that "
                             f"requested it can no longer be used ({exc}); an admin requests "
                             "a new one") from exc
    if principal.id != override.requested_by or not allows(
            principal.id, principal.role, "releases", "override_request"):
        raise ReleaseRefused(f"override {override.id} no longer stands: its requester no "
                             "longer holds the permission to request overrides (releases, "
                             "override_request); an admin requests a new one")


def _check_not_party(session: Session, ckpt: Checkpoint, actor: tuple[str, str | None]
                     ) -> None:
    """Neither half comes from the weights' owner or whoever asked for their release, nor
    from anyone linked to them (policy.persons)."""
    persons.check_not_party(session, actor=actor, parties=_parties(session, ckpt),
                            action=ACTION)


def _parties(session: Session, ckpt: Checkpoint) -> list[tuple[str, str | None, str]]:
    """The checkpoint's owner (with the key that created its run) and each principal that
    asked for its release or export (with the key it asked with)."""
    run = session.get(TrainingRun, ckpt.training_run_id)
    found = [(ckpt.principal_id, run.api_key_id if run else None, f"owns {ckpt.tinker_path}")]
    for row in session.scalars(select(ReleaseRequest).where(
            ReleaseRequest.checkpoint_id == ckpt.id).order_by(ReleaseRequest.created_at)):
        future = session.get(Future, row.future_id) if row.future_id else None
        found.append((row.requested_by, future.api_key_id if future else None,
                      f"asked for the release of {ckpt.tinker_path} ({row.id})"))
    return found


def _pending(session: Session, ckpt: Checkpoint) -> list[ReleaseOverride]:
    return list(session.scalars(select(ReleaseOverride).where(
        ReleaseOverride.checkpoint_id == ckpt.id, ReleaseOverride.status == "pending")
        .order_by(ReleaseOverride.requested_at)))


def _bound_sha256(ckpt: Checkpoint, checkpoint_root: Path) -> str:
    """The adapter's SHA-256 as evaluated, checked against the bytes on disk."""
    on_disk = _disk_sha256(ckpt, checkpoint_root)
    if ckpt.adapter_sha256 is None:
        ckpt.adapter_sha256 = on_disk
    elif on_disk != ckpt.adapter_sha256:
        raise ReleaseRefused(f"the adapter bytes of {ckpt.tinker_path} no longer match the "
                             "evaluated ones; an override cannot be bound to them")
    return ckpt.adapter_sha256


def _bound_checkpoint(session: Session, override: ReleaseOverride, checkpoint_root: Path
                      ) -> Checkpoint:
    """The checkpoint at the override's path, if it is still the content it was bound to."""
    ckpt = session.scalars(select(Checkpoint).where(
        Checkpoint.tinker_path == override.tinker_path)).first()
    if ckpt is None or ckpt.id != override.checkpoint_id:
        raise ReleaseRefused(f"{override.tinker_path} is not the checkpoint override "
                             f"{override.id} was requested for (it was deleted or replaced); "
                             "request a new override for what is there now")
    if not override.adapter_sha256 or ckpt.adapter_sha256 != override.adapter_sha256 \
            or _disk_sha256(ckpt, checkpoint_root) != override.adapter_sha256:
        raise ReleaseRefused(f"the content of {override.tinker_path} is not the content "
                             f"override {override.id} was bound to; request a new override")
    return ckpt


def _disk_sha256(ckpt: Checkpoint, checkpoint_root: Path) -> str:
    path = checkpoint_root / ckpt.storage_dir / ADAPTER_FILE
    try:
        return file_sha256(path)
    except OSError as exc:
        raise ReleaseRefused(f"the adapter files of {ckpt.tinker_path} are missing") from exc


def _check_lineage(session: Session, ckpt: Checkpoint) -> None:
    """A blocked lineage is never released; an upstream quarantine is overridden first."""
    run = session.get(TrainingRun, ckpt.training_run_id)
    if run is None:
        raise ReleaseRefused(f"the training run of {ckpt.tinker_path} no longer exists")
    lineage.check_lineage_not_blocked(session, run, "released")
    upstream = lineage.standing_hold(session, run.id, for_override=True)
    if upstream is not None:
        raise ReleaseRefused(
            f"{ckpt.tinker_path} descends from {upstream.tinker_path}, which is quarantined: "
            "weights that descend from quarantined weights are released only after the "
            "two-person override of that checkpoint")


def _check_reason(reason: str) -> None:
    if not isinstance(reason, str) or len(reason.strip()) < MIN_REASON:
        raise ReleaseRefused(f"give a reason of at least {MIN_REASON} characters; it is kept "
                             "in the audit trail")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
