"""Access requests: a researcher asks for a key without having one, an admin approves
(with role and scopes) or rejects, and the researcher claims the key exactly once.

The requester gets a one-time claim token (`tml-claim-…`, stored as SHA-256). Every step
is audited with the state before and after. A request's name must be free (no principal,
no other open request: policy.keys.check_name_free, and a unique index on open requests'
names), and the claimed key enrolls a new principal recorded as enrolled by the approving
admin — a claim never joins an existing principal. Must not import fastapi or engine; must not
store plaintext tokens or keys.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import ROLES, AccessRequest, ApiKey, utcnow
from policy.errors import KeyRejected, LimitExceeded, PolicyError
from policy.keys import CLAIM_PREFIX, VIA_ACCESS_REQUEST, check_name_free, create_key, hash_key
from policy.scopes import Scopes, check_overrides

MAX_FIELD = {"name": 200, "contact": 300, "purpose": 2000}


class RequestNotFound(PolicyError):
    """No access request with that id (HTTP 404)."""


def request_access(session: Session, *, name: str, contact: str, purpose: str,
                   base_models: list[str]) -> tuple[AccessRequest, str]:
    """File a request; returns it and the plaintext claim token (shown once)."""
    fields = {"name": name.strip(), "contact": contact.strip(), "purpose": purpose.strip()}
    for field, value in fields.items():
        if not value or len(value) > MAX_FIELD[field]:
            raise LimitExceeded(f"{field} is required (at most {MAX_FIELD[field]} characters)")
    if not all(isinstance(m, str) and m for m in base_models):
        raise LimitExceeded("base_models must be a list of model names")
    check_name_free(session, fields["name"])
    token = CLAIM_PREFIX + secrets.token_urlsafe(32)
    req = AccessRequest(id=str(uuid.uuid4()), wanted_base_models=json.dumps(base_models),
                        claim_token_hash=hash_key(token), status="pending", **fields)
    session.add(req)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent request took the name first
        raise LimitExceeded(f"the name {fields['name']!r} is already taken; choose another"
                            ) from exc
    audit_log.append(session, actor="anonymous", event_type="access.request", decision="info",
                     subject=req.id, payload={"name": req.name, "base_models": base_models})
    return req, token


def list_requests(session: Session, status: str | None = None) -> list[AccessRequest]:
    stmt = select(AccessRequest).order_by(AccessRequest.created_at)
    if status is not None:
        stmt = stmt.where(AccessRequest.status == status)
    return list(session.scalars(stmt).all())


def _pending(session: Session, request_id: str) -> AccessRequest:
    req = session.get(AccessRequest, request_id)
    if req is None:
        raise RequestNotFound(f"access request {request_id} not found")
    if req.status != "pending":
        raise LimitExceeded(f"access request {request_id} is already {req.status}")
    return req


def approve(session: Session, *, request_id: str, actor: str, defaults: Scopes,
            role: str = "researcher", scopes: dict[str, Any] | None = None,
            expires_in_days: int | None = None, reason: str = "") -> AccessRequest:
    """Approve with a role and scope overrides (validated against `defaults` now, so a
    typo is caught by the admin, not by the researcher at claim time)."""
    scopes = check_overrides(scopes or {}, defaults)
    if role not in ROLES:
        raise LimitExceeded(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    if expires_in_days is not None and expires_in_days < 1:
        raise LimitExceeded("expires_in_days must be at least 1")
    req = _pending(session, request_id)
    req.status, req.role, req.scopes = "approved", role, json.dumps(scopes or {})
    req.expires_in_days, req.decided_by, req.decided_at = expires_in_days, actor, utcnow()
    req.decision_reason = reason or None
    audit_log.append(session, actor=actor, event_type="access.approve", decision="allow",
                     subject=req.id,
                     payload={"before": "pending", "after": "approved", "role": role,
                              "scopes": scopes or {}, "expires_in_days": expires_in_days})
    return req


def reject(session: Session, *, request_id: str, actor: str, reason: str) -> AccessRequest:
    if not reason.strip():
        raise LimitExceeded("a rejection needs a reason (the requester is shown it)")
    req = _pending(session, request_id)
    req.status, req.decided_by, req.decided_at = "rejected", actor, utcnow()
    req.decision_reason = reason.strip()[:1000]
    audit_log.append(session, actor=actor, event_type="access.reject", decision="deny",
                     subject=req.id, payload={"before": "pending", "after": "rejected",
                                              "reason": req.decision_reason})
    return req


def claim(session: Session, token: str, defaults: Scopes) -> str:
    """Exchange an approved request's claim token for its key, exactly once."""
    req = find_by_token(session, token)
    if req is None:
        raise KeyRejected("unknown claim token")
    if req.status != "approved":
        raise KeyRejected(describe_request(req))
    expires = (utcnow() + dt.timedelta(days=req.expires_in_days)
               if req.expires_in_days else None)
    plaintext = create_key(session, owner=req.name, role=req.role, actor=req.decided_by or "",
                           defaults=defaults, expires_at=expires, scopes=json.loads(req.scopes),
                           via=VIA_ACCESS_REQUEST, request_id=req.id)
    req.status, req.claimed_at = "claimed", utcnow()
    req.key_id = session.scalars(select(ApiKey.id).where(
        ApiKey.key_hash == hash_key(plaintext))).one()
    audit_log.append(session, actor="anonymous", event_type="access.claim", decision="allow",
                     subject=req.id, payload={"before": "approved", "after": "claimed",
                                              "key_id": req.key_id})
    return plaintext


def find_by_token(session: Session, token: str) -> AccessRequest | None:
    return session.scalars(select(AccessRequest).where(
        AccessRequest.claim_token_hash == hash_key(token))).first()


def describe_request(req: AccessRequest) -> str:
    """What a claim token's holder is told, by state."""
    if req.status == "pending":
        return "your access request is pending approval by an admin; no key exists yet"
    if req.status == "rejected":
        return f"your access request was rejected: {req.decision_reason}"
    if req.status == "approved":
        return ("your access request was approved: claim your key with "
                "POST /api/v1/access_requests/claim (or `loragate keys claim`)")
    return "this claim token was already exchanged for a key; use that key"
