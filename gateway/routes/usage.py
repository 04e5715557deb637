"""Usage: per person (`principals`: today's budgets and the counts the quotas judge —
summed over all the person's keys and runs — against the limits they are held to), per API
key (what each key used, and its own scopes) and per training run.

A caller sees their own person, keys and runs; principals the policy lets read all records
(auditors, admins) may ask for one principal's (`?owner=NAME`) or everyone's
(`?owner=*`). The numbers come from policy.quotas.usage_report."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from audit.models import Principal
from gateway.context import Ctx
from gateway.errors import Forbidden, NotFound
from gateway.ownership import reads_all
from policy.quotas import usage_report

router = APIRouter(prefix="/api/v1")


@router.get("/usage", name="get_usage")
def get_usage(ctx: Ctx, owner: str | None = None) -> dict[str, Any]:
    principals: list[str] | None = [ctx.principal.id]
    if owner is not None and owner != ctx.principal.name:
        if not reads_all(ctx):
            raise Forbidden("only principals allowed to read all records (auditors, admins) "
                            "may see another principal's usage; drop the owner parameter")
        principals = None if owner == "*" else [_principal_id(ctx, owner)]
    ctx.note(subject=owner or ctx.principal.name)
    return usage_report(ctx.session, principals, ctx.state.scope_defaults)


def _principal_id(ctx: Ctx, name: str) -> str:
    found = ctx.session.scalars(select(Principal.id).where(Principal.name == name)).first()
    if found is None:
        raise NotFound(f"principal {name!r} not found")
    return found
