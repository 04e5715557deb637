"""API keys: creation and authentication.

Keys look like `tml-…` (the Tinker SDK refuses anything else) and are stored only as
SHA-256; the plaintext is returned once, at creation. Must not log or store plaintext keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.models import ROLES, ApiKey, Principal, as_utc, utcnow
from policy.errors import KeyNotFound, KeyRejected, LimitExceeded
from policy.scopes import Scopes, check_overrides

KEY_PREFIX = "tml-"
# Claim tokens look like keys to the SDK, so presenting one by mistake gets a 401 that says
# what state the access request is in.
CLAIM_PREFIX = "tml-claim-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def ensure_principal(session: Session, name: str, role: str) -> Principal:
    """The principal called `name`, created with `role` if new. A name keeps its role."""
    if role not in ROLES:
        raise LimitExceeded(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    principal = session.scalars(select(Principal).where(Principal.name == name)).first()
    if principal is None:
        principal = Principal(id=str(uuid.uuid4()), name=name, role=role)
        session.add(principal)
        session.flush()
    elif principal.role != role:
        raise LimitExceeded(f"principal {name!r} already exists with role {principal.role!r}")
    return principal


def create_key(
    session: Session, *, owner: str, role: str, actor: str, defaults: Scopes,
    expires_at: dt.datetime | None = None, scopes: dict[str, object] | None = None,
) -> str:
    """Create a key for `owner` (creating the principal if needed); returns the plaintext.

    `scopes` are the admin's overrides of `defaults`; without `expires_at` the key expires
    after the effective `expires_in_days` (never, if that is null)."""
    scopes = check_overrides(scopes or {}, defaults)
    if expires_at is None:
        days = defaults.with_overrides(scopes).expires_in_days
        expires_at = utcnow() + dt.timedelta(days=days) if days else None
    principal = ensure_principal(session, owner, role)
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=str(uuid.uuid4()), principal_id=principal.id, key_hash=hash_key(plaintext),
                 prefix=plaintext[:10], status="active", expires_at=expires_at,
                 scopes=json.dumps(scopes or {}))
    session.add(key)
    session.flush()
    audit_log.append(session, actor=actor, event_type="keys.create", decision="allow",
                     subject=principal.id,
                     payload={"key_id": key.id, "role": role, "owner": owner,
                              "scopes": scopes or {},
                              "expires_at": expires_at.isoformat() if expires_at else None})
    return plaintext


def list_keys(session: Session) -> list[tuple[ApiKey, Principal]]:
    rows = session.execute(select(ApiKey, Principal).join(
        Principal, Principal.id == ApiKey.principal_id).order_by(ApiKey.created_at)).all()
    return [(key, principal) for key, principal in rows]


def revoke_key(session: Session, *, key_id: str, actor: str, reason: str) -> ApiKey:
    """Revoke a key for good; its next request gets a 401 saying it was revoked."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyNotFound(f"API key {key_id} not found")
    if key.status == "revoked":
        raise LimitExceeded(f"API key {key_id} is already revoked")
    before = key.status
    key.status, key.revoked_at = "revoked", utcnow()
    audit_log.append(session, actor=actor, event_type="keys.revoke", decision="allow",
                     subject=key.principal_id,
                     payload={"key_id": key_id, "before": before, "after": "revoked",
                              "reason": reason[:500]})
    return key


def authenticate(session: Session, presented: str | None) -> tuple[Principal, ApiKey]:
    """The principal and key behind a presented key, or KeyRejected saying why not."""
    if not presented:
        raise KeyRejected("missing API key: send it in the X-API-Key header")
    if not presented.startswith(KEY_PREFIX):
        raise KeyRejected("malformed API key: keys start with 'tml-'")
    if presented.startswith(CLAIM_PREFIX):
        from policy.access import describe_request, find_by_token

        req = find_by_token(session, presented)
        raise KeyRejected(describe_request(req) if req else "unknown claim token")
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(presented))).first()
    if key is None:
        raise KeyRejected("unknown API key")
    if key.status == "revoked":
        raise KeyRejected("this API key has been revoked")
    if key.status != "active":
        raise KeyRejected(f"this API key is {key.status}")
    if key.expires_at is not None and as_utc(key.expires_at) <= utcnow():
        raise KeyRejected("this API key has expired")
    principal = session.get(Principal, key.principal_id)
    if principal is None:  # foreign key makes this impossible short of tampering
        raise KeyRejected("unknown API key")
    return principal, key
