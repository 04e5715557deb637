"""Admin API: the policy rules in force, and API keys.

Policy edits apply to the next request (no restart) and are audited with the policy
before and after; key creation and revocation are audited with who did them. Creating a
key enrolls a new person; a key for an existing principal is added only through
`POST /admin/principal_keys`, with a reason (policy.keys)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, ConfigDict, Field

from audit.models import ACCESS_REQUEST_STATES, ApiKey, Principal, as_utc, utcnow
from gateway.context import Ctx, JsonBody, OptionalJsonBody, parse
from gateway.errors import BadRequest
from policy import access, authz, keys
from policy.scopes import Scopes, effective
from policy.screening import tally

router = APIRouter(prefix="/api/v1/admin")


def _rule_view(rule: Any) -> dict[str, Any]:
    return {"id": rule.id, "ptype": rule.ptype, "values": rule.values()}


@router.get("/policy", name="admin_list_policy")
def list_policy(ctx: Ctx) -> dict[str, Any]:
    return {"rules": [_rule_view(r) for r in authz.list_rules(ctx.session)]}


class PolicyRule(BaseModel):
    """A casbin rule: who (a principal id or a role), on what, which action, allow/deny."""

    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1)
    resource: str = Field(min_length=1)
    action: str = Field(min_length=1)
    effect: str = Field(min_length=1)


@router.post("/policy/rules", name="admin_add_policy_rule")
def add_policy_rule(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    req = parse(PolicyRule, body)
    rule = authz.add_rule(ctx.session, actor=ctx.principal.id, subject=req.subject,
                          resource=req.resource, action=req.action, effect=req.effect)
    ctx.note(subject=f"policy_rules/{rule.id}")
    return _rule_view(rule)


@router.delete("/policy/rules/{rule_id}", name="admin_remove_policy_rule")
def remove_policy_rule(rule_id: int, ctx: Ctx) -> Response:
    authz.remove_rule(ctx.session, actor=ctx.principal.id, rule_id=rule_id)
    ctx.note(subject=f"policy_rules/{rule_id}")
    return Response(status_code=204)


def _key_view(key: ApiKey, principal: Principal, defaults: Scopes) -> dict[str, Any]:
    return {"id": key.id, "prefix": key.prefix, "owner": principal.name, "role": principal.role,
            "status": key.status, "created_at": as_utc(key.created_at).isoformat(),
            "created_by": key.created_by, "created_via": key.created_via,
            "owner_enrolled_by": principal.enrolled_by,
            "owner_enrolled_via": principal.enrolled_via,
            "expires_at": as_utc(key.expires_at).isoformat() if key.expires_at else None,
            "revoked_at": as_utc(key.revoked_at).isoformat() if key.revoked_at else None,
            "scope_overrides": json.loads(key.scopes or "{}"),
            "scopes": effective(defaults, key.scopes).to_dict(),
            "owner_id": principal.id, "owner_screening": tally.principal_tally(principal)}


@router.get("/keys", name="admin_list_keys")
def list_api_keys(ctx: Ctx) -> dict[str, Any]:
    defaults = ctx.state.scope_defaults
    return {"keys": [_key_view(k, p, defaults) for k, p in keys.list_keys(ctx.session)]}


class NewKey(BaseModel):
    """A key for a new person: their name (the principal's), role, and optionally an
    expiry and scope overrides."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    owner: str = Field(min_length=1)
    role: str = "researcher"
    expires_in_days: int | None = Field(default=None, ge=1)
    scopes: dict[str, Any] | None = None


def _expiry(days: int | None) -> dt.datetime | None:
    return utcnow() + dt.timedelta(days=days) if days else None


@router.post("/keys", name="admin_create_key")
def create_api_key(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """An admin creating a key enrolls a new person: an approval by that admin (audited
    as one, and recorded as the person's enroller). A name that exists or that an open
    access request holds is refused. The plaintext key is in this response only."""
    req = parse(NewKey, body)
    plaintext = keys.create_key(ctx.session, owner=req.owner, role=req.role,
                                actor=ctx.principal.id, expires_at=_expiry(req.expires_in_days),
                                scopes=req.scopes or {}, defaults=ctx.state.scope_defaults,
                                via=keys.VIA_ADMIN)
    principal, key = keys.authenticate(ctx.session, plaintext)
    ctx.note(subject=req.owner, role=req.role)
    return {"key": plaintext, **_key_view(key, principal, ctx.state.scope_defaults)}


class AddKey(BaseModel):
    """Another key for an existing principal: who, why (kept in the audit trail), and
    optionally an expiry and scope overrides."""

    model_config = ConfigDict(extra="forbid")
    principal: str
    reason: str
    expires_in_days: int | None = Field(default=None, ge=1)
    scopes: dict[str, Any] | None = None


@router.post("/principal_keys", name="admin_add_key")
def add_api_key(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """The explicit, audited "add key to principal" action. The plaintext key is in this
    response only."""
    req = parse(AddKey, body)
    plaintext, principal = keys.add_key(
        ctx.session, principal_name=req.principal, actor=ctx.principal.id, reason=req.reason,
        defaults=ctx.state.scope_defaults, expires_at=_expiry(req.expires_in_days),
        scopes=req.scopes)
    _, key = keys.authenticate(ctx.session, plaintext)
    ctx.note(subject=principal.id, key_id=key.id)
    return {"key": plaintext, **_key_view(key, principal, ctx.state.scope_defaults)}


class Reason(BaseModel):
    """Why (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = ""


@router.post("/keys/{key_id}/revoke", name="admin_revoke_key")
def revoke_api_key(key_id: str, ctx: Ctx, body: OptionalJsonBody = None) -> dict[str, Any]:
    reason = parse(Reason, body or {}).reason or "revoked by an admin"
    key = keys.revoke_key(ctx.session, key_id=key_id, actor=ctx.principal.id, reason=reason)
    ctx.note(subject=key_id)
    return {"id": key.id, "status": key.status}


class Reinstatement(BaseModel):
    """What the review of the person's flagged data found (kept in the audit trail)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    reason: str = Field(min_length=1)


@router.post("/principals/{principal_id}/screening/reinstate",
             name="admin_reinstate_principal")
def reinstate_principal(principal_id: str, ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    """Lift a person's screening block after reviewing the flagged data their runs and dry
    runs sent (the audit trail's `screening.refused` rows); audited, and their tally
    starts afresh. An admin never reinstates themselves."""
    req = parse(Reinstatement, body)
    principal = tally.reinstate_principal(ctx.session, principal_id, actor=ctx.principal.id,
                                          reason=req.reason, request_id=ctx.request_id)
    ctx.note(subject=principal_id)
    return {"id": principal.id, "name": principal.name,
            "screening": tally.principal_tally(principal)}


def _request_view(req: Any) -> dict[str, Any]:
    return {"id": req.id, "name": req.name, "contact": req.contact, "purpose": req.purpose,
            "base_models": json.loads(req.wanted_base_models), "status": req.status,
            "role": req.role, "scopes": json.loads(req.scopes),
            "created_at": req.created_at.isoformat(), "decided_by": req.decided_by,
            "decision_reason": req.decision_reason}


@router.get("/access_requests", name="admin_list_access_requests")
def list_access_requests(ctx: Ctx, status: str | None = None) -> dict[str, Any]:
    if status is not None and status not in ACCESS_REQUEST_STATES:
        raise BadRequest(f"status must be one of {', '.join(ACCESS_REQUEST_STATES)}")
    return {"requests": [_request_view(r) for r in access.list_requests(ctx.session, status)]}


class AccessApproval(Reason):
    """An access approval: the role and scope overrides the new key gets, and its expiry."""

    role: str = "researcher"
    scopes: dict[str, Any] | None = None
    expires_in_days: int | None = Field(default=None, ge=1)


@router.post("/access_requests/{request_id}/approve", name="admin_approve_access")
def approve_access(request_id: str, ctx: Ctx, body: OptionalJsonBody = None) -> dict[str, Any]:
    approval = parse(AccessApproval, body or {})
    req = access.approve(ctx.session, request_id=request_id, actor=ctx.principal.id,
                         role=approval.role, scopes=approval.scopes or {},
                         expires_in_days=approval.expires_in_days, reason=approval.reason,
                         defaults=ctx.state.scope_defaults)
    ctx.note(subject=request_id)
    return _request_view(req)


@router.post("/access_requests/{request_id}/reject", name="admin_reject_access")
def reject_access(request_id: str, ctx: Ctx, body: OptionalJsonBody = None) -> dict[str, Any]:
    req = access.reject(ctx.session, request_id=request_id, actor=ctx.principal.id,
                        reason=parse(Reason, body or {}).reason)
    ctx.note(subject=request_id)
    return _request_view(req)
