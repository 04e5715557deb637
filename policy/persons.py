"""Persons, not keys: whether two principals are independent people, for the two-person
rule of the release override.

Every principal records who enrolled it (`enrolled_by`: the admin who created its first
key or approved its access request, or an operator actor such as "cli") and every key who
issued it (`created_by`). The operator — whoever runs `loragate` against the database —
is the root of trust: what it enrolls counts as independent. A person's *circle* is the
principal itself, the admins up its chain of enrollers (who enrolled it, who enrolled
them, …), and the issuer of the key it acts with and that issuer's chain. Two persons are
independent when their circles do not meet: neither enrolled the other or issued the key
the other uses (directly or through someone they enrolled), and no admin enrolled both.
So an admin cannot approve their own override with a key minted for a new name, an
approved access request, or a key added to a real auditor.

Neither half may come from a party to what is decided either: whoever owns the weights
or asked for their release. An actor whose circle meets such a party's circle (the owner
themself, their enroller, an admin who enrolled both, the issuer of either key) is not
independent of it (`check_not_party`). A pending override is cancelled (audited) when its
weights go away or the key that requested it is revoked (`cancel_override`).

Must not import fastapi, engine or evals.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import ApiKey, Principal, ReleaseOverride, utcnow
from policy.errors import PolicyError

MAX_CHAIN = 64  # enrollment chains are short; this only stops a corrupted cycle


class NotIndependent(PolicyError):
    """The two halves of a two-person action come from people who are not independent
    (HTTP 403)."""


def circle(session: Session, principal_id: str, key_id: str | None) -> set[str]:
    """The principal ids that could stand behind `principal_id` acting with `key_id`."""
    members = _chain(session, principal_id)
    key = session.get(ApiKey, key_id) if key_id else None
    if key is not None and key.created_by:
        members |= _chain(session, key.created_by)
    return members


def _chain(session: Session, actor: str) -> set[str]:
    """`actor` and its enrollers, up to the operator (actors that are not principals)."""
    found: set[str] = set()
    current: str | None = actor
    while current and current not in found and len(found) < MAX_CHAIN:
        principal = session.get(Principal, current)
        if principal is None:
            break
        found.add(current)
        current = principal.enrolled_by
    return found


def check_independent(session: Session, *, first: tuple[str, str | None],
                      second: tuple[str, str | None], action: str) -> None:
    """Refuse `action` unless the two (principal id, key id) pairs are independent people;
    the refusal names who links them."""
    if first[0] == second[0]:
        raise NotIndependent(f"{action} needs two different persons; the same principal "
                             "cannot do both halves")
    shared = circle(session, *first) & circle(session, *second)
    if not shared:
        return
    raise NotIndependent(
        f"{action} needs two independent people, but {_name(session, second[0])} and "
        f"{_name(session, first[0])} are linked through {_names(session, shared)}: one "
        "enrolled the other or "
        "issued the key used, or the same admin enrolled both. Ask a person enrolled "
        "independently (by another admin, or by the operator)")


def check_not_party(session: Session, *, actor: tuple[str, str | None],
                    parties: list[tuple[str, str | None, str]], action: str) -> None:
    """Refuse `action` when the actor (principal id, key id) is, or is linked to, one of
    `parties` (principal id, key id, what makes them a party): their circles meet."""
    mine = circle(session, *actor)
    for principal_id, key_id, stake in parties:
        who = _name(session, principal_id)
        if actor[0] == principal_id:
            raise NotIndependent(f"{action} must come from someone other than {who}, who "
                                 f"{stake}; ask a person enrolled independently")
        shared = mine & circle(session, principal_id, key_id)
        if shared:
            raise NotIndependent(
                f"{action} must come from people independent of {who}, who {stake}; "
                f"{_name(session, actor[0])} is linked to them through "
                f"{_names(session, shared)} (one enrolled the other or issued the key used, "
                "or the same admin enrolled both). Ask a person enrolled independently")


def cancel_override(session: Session, override: ReleaseOverride, *, actor: str, reason: str,
                    request_id: str = "", **context: str) -> None:
    """Cancel a pending release override — its weights are going away, or the key that
    requested it was revoked — audited first (`context`: more for the audit row)."""
    audit_log.append(session, actor=actor, event_type="release.override_cancelled",
                     decision="cancelled", subject=override.tinker_path, request_id=request_id,
                     payload={"override_id": override.id,
                              "checkpoint_id": override.checkpoint_id,
                              "adapter_sha256": override.adapter_sha256, **context,
                              "reason": reason})
    override.status, override.cancel_reason = "cancelled", reason
    override.decided_at = utcnow()


def _names(session: Session, principal_ids: set[str]) -> str:
    return ", ".join(sorted(_name(session, p) for p in principal_ids))


def _name(session: Session, principal_id: str) -> str:
    principal = session.get(Principal, principal_id)
    return repr(principal.name) if principal else principal_id
