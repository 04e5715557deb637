"""Admin API: the policy rules in force. Edits apply to the next request (no restart) and
are audited with the policy before and after."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from gateway.context import Ctx, JsonBody
from gateway.errors import BadRequest
from policy import authz

router = APIRouter(prefix="/api/v1/admin")


def _rule_view(rule: Any) -> dict[str, Any]:
    return {"id": rule.id, "ptype": rule.ptype, "values": rule.values()}


@router.get("/policy", name="admin_list_policy")
def list_policy(ctx: Ctx) -> dict[str, Any]:
    return {"rules": [_rule_view(r) for r in authz.list_rules(ctx.session)]}


@router.post("/policy/rules", name="admin_add_policy_rule")
def add_policy_rule(ctx: Ctx, body: JsonBody) -> dict[str, Any]:
    fields = {k: body.get(k) for k in ("subject", "resource", "action", "effect")}
    missing = [k for k, v in fields.items() if not isinstance(v, str) or not v]
    if missing:
        raise BadRequest(f"missing or empty fields: {', '.join(missing)}")
    rule = authz.add_rule(ctx.session, actor=ctx.principal.id, **fields)  # type: ignore[arg-type]
    ctx.note(subject=f"policy_rules/{rule.id}")
    return _rule_view(rule)


@router.delete("/policy/rules/{rule_id}", name="admin_remove_policy_rule")
def remove_policy_rule(rule_id: int, ctx: Ctx) -> Response:
    authz.remove_rule(ctx.session, actor=ctx.principal.id, rule_id=rule_id)
    ctx.note(subject=f"policy_rules/{rule_id}")
    return Response(status_code=204)
