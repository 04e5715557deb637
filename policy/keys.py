"""API keys and the principals they belong to: enrolling a person with a first key,
adding a key to an existing person (an explicit, audited action of its own), revocation
and authentication.

Keys look like `tml-…` (the Tinker SDK refuses anything else) and are stored only as
SHA-256; the plaintext is returned once, at creation. Every principal records who enrolled
it and every key who issued it (policy.persons reads these for the two-person rule).
Revoking a key also ends what it asked for that still waits on it: its pending release
overrides are cancelled (audited); a download link it asked for is refused at every fetch
once the key is not usable (`authenticate_key_id`).
Naming an owner never joins an existing principal: a name that exists, or that an open
access request holds, is refused. Must not log or store plaintext keys.
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
from audit.models import (
    ROLES,
    AccessRequest,
    ApiKey,
    Principal,
    ReleaseOverride,
    as_utc,
    utcnow,
)
from policy.errors import KeyNotFound, KeyRejected, LimitExceeded
from policy.persons import cancel_override
from policy.scopes import Scopes, check_overrides

KEY_PREFIX = "tml-"
# Claim tokens look like keys to the SDK, so presenting one by mistake gets a 401 that says
# what state the access request is in.
CLAIM_PREFIX = "tml-claim-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# How a principal was enrolled or a key issued (`enrolled_via`, `created_via`).
VIA_ADMIN, VIA_OPERATOR, VIA_ACCESS_REQUEST, VIA_ADD_KEY = (
    "admin", "operator", "access_request", "add_key")
MIN_ADD_KEY_REASON = 10


def find_principal(session: Session, name: str) -> Principal | None:
    return session.scalars(select(Principal).where(Principal.name == name)).first()


def check_name_free(session: Session, name: str, *, request_id: str | None = None) -> None:
    """A new principal's name must be free: no principal has it, and no open (pending or
    approved) access request other than `request_id` holds it."""
    taken = find_principal(session, name)
    if taken is not None:
        raise LimitExceeded(
            f"the name {name!r} is already taken: principal {name!r} already exists with role "
            f"{taken.role!r}. Choose another name, or give that principal another key "
            f"explicitly (`loragate keys add {name} --reason R`, or POST "
            "/api/v1/admin/principal_keys); adding a key is audited")
    held = session.scalars(select(AccessRequest.id).where(
        AccessRequest.name == name, AccessRequest.status.in_(("pending", "approved")),
        AccessRequest.id != (request_id or ""))).first()
    if held is not None:
        raise LimitExceeded(f"the name {name!r} is already taken by an open access request; "
                            "choose another name (or decide that request first)")


def enroll(session: Session, *, name: str, role: str, actor: str, via: str,
           request_id: str | None = None) -> Principal:
    """A new principal, recording who enrolled it and how (audited). `request_id` is the
    access request being claimed, whose own hold on the name does not count."""
    if role not in ROLES:
        raise LimitExceeded(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    check_name_free(session, name, request_id=request_id)
    principal = Principal(id=str(uuid.uuid4()), name=name, role=role, enrolled_by=actor,
                          enrolled_via=via)
    session.add(principal)
    session.flush()
    audit_log.append(session, actor=actor, event_type="principals.enroll", decision="allow",
                     subject=principal.id,
                     payload={"name": name, "role": role, "enrolled_by": actor, "via": via,
                              "access_request": request_id})
    return principal


def create_key(
    session: Session, *, owner: str, role: str, actor: str, defaults: Scopes,
    expires_at: dt.datetime | None = None, scopes: dict[str, object] | None = None,
    via: str = VIA_OPERATOR, request_id: str | None = None,
) -> str:
    """Enroll the new principal `owner` with its first key; returns the plaintext. A name
    that exists or that an open access request holds is refused (`add_key` is the only
    way to give an existing principal another key).

    `scopes` are the admin's overrides of `defaults`; without `expires_at` the key expires
    after the effective `expires_in_days` (never, if that is null)."""
    scopes, expires_at = _terms(defaults, scopes, expires_at)
    principal = enroll(session, name=owner, role=role, actor=actor, via=via,
                       request_id=request_id)
    return _issue(session, principal, actor=actor, via=via, scopes=scopes,
                  expires_at=expires_at, event_type="keys.create")


def add_key(
    session: Session, *, principal_name: str, actor: str, reason: str, defaults: Scopes,
    expires_at: dt.datetime | None = None, scopes: dict[str, object] | None = None,
) -> tuple[str, Principal]:
    """Give the existing principal `principal_name` another key: an explicit action with a
    reason, audited as `keys.add` with who issued it. Returns the plaintext and the
    principal."""
    principal = find_principal(session, principal_name)
    if principal is None:
        raise KeyNotFound(f"principal {principal_name!r} not found; enroll a new person with "
                          "`keys create` or an access request")
    if len(reason.strip()) < MIN_ADD_KEY_REASON:
        raise LimitExceeded(f"give a reason of at least {MIN_ADD_KEY_REASON} characters for "
                            "adding a key to an existing principal; it is kept in the audit "
                            "trail")
    scopes, expires_at = _terms(defaults, scopes, expires_at)
    plaintext = _issue(session, principal, actor=actor, via=VIA_ADD_KEY, scopes=scopes,
                       expires_at=expires_at, event_type="keys.add",
                       reason=reason.strip()[:1000])
    return plaintext, principal


def _terms(defaults: Scopes, scopes: dict[str, object] | None, expires_at: dt.datetime | None
           ) -> tuple[dict[str, object], dt.datetime | None]:
    """Checked scope overrides, and the expiry (the effective lifetime when not given)."""
    scopes = check_overrides(scopes or {}, defaults) or {}
    if expires_at is None:
        days = defaults.with_overrides(scopes).expires_in_days
        expires_at = utcnow() + dt.timedelta(days=days) if days else None
    return scopes, expires_at


def _issue(session: Session, principal: Principal, *, actor: str, via: str,
           scopes: dict[str, object], expires_at: dt.datetime | None, event_type: str,
           **evidence: str) -> str:
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=str(uuid.uuid4()), principal_id=principal.id, key_hash=hash_key(plaintext),
                 prefix=plaintext[:10], status="active", expires_at=expires_at,
                 scopes=json.dumps(scopes), created_by=actor, created_via=via)
    session.add(key)
    session.flush()
    audit_log.append(session, actor=actor, event_type=event_type, decision="allow",
                     subject=principal.id,
                     payload={"key_id": key.id, "role": principal.role, "owner": principal.name,
                              "scopes": scopes, "created_by": actor, "via": via,
                              "principal_enrolled_by": principal.enrolled_by,
                              "expires_at": expires_at.isoformat() if expires_at else None,
                              **evidence})
    return plaintext


def list_keys(session: Session) -> list[tuple[ApiKey, Principal]]:
    rows = session.execute(select(ApiKey, Principal).join(
        Principal, Principal.id == ApiKey.principal_id).order_by(ApiKey.created_at)).all()
    return [(key, principal) for key, principal in rows]


def revoke_key(session: Session, *, key_id: str, actor: str, reason: str) -> ApiKey:
    """Revoke a key for good; its next request gets a 401 saying it was revoked, and the
    release overrides it requested that still wait for approval are cancelled."""
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
    _cancel_overrides_of(session, key, actor=actor)
    return key


def _cancel_overrides_of(session: Session, key: ApiKey, *, actor: str) -> None:
    """The revoked key's pending release overrides: cancelled, each audited first."""
    pending = session.scalars(select(ReleaseOverride).where(
        ReleaseOverride.requested_key_id == key.id, ReleaseOverride.status == "pending")
        .order_by(ReleaseOverride.requested_at)).all()
    for override in pending:
        cancel_override(session, override, actor=actor, api_key_id=key.id,
                        reason=f"the API key {key.id} that requested it was revoked")
    session.flush()


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
    return _usable(session, key)


def authenticate_key_id(session: Session, key_id: str) -> tuple[Principal, ApiKey]:
    """The principal and key behind a key id that a server-signed credential names (a
    download link, gateway.downloads), held to the same rules as a presented key: a key
    revoked or expired since stops what it issued."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise KeyRejected("unknown API key")
    return _usable(session, key)


def unusable_because(status: str, expires_at: dt.datetime | None,
                     now: dt.datetime | None = None) -> str | None:
    """Why a key of this status and expiry cannot be used now, or None when it can."""
    if status == "revoked":
        return "this API key has been revoked"
    if status != "active":
        return f"this API key is {status}"
    if expires_at is not None and as_utc(expires_at) <= (now or utcnow()):
        return "this API key has expired"
    return None


def _usable(session: Session, key: ApiKey) -> tuple[Principal, ApiKey]:
    refusal = unusable_because(key.status, key.expires_at)
    if refusal is not None:
        raise KeyRejected(refusal)
    principal = session.get(Principal, key.principal_id)
    if principal is None:  # foreign key makes this impossible short of tampering
        raise KeyRejected("unknown API key")
    return principal, key
