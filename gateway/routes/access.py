"""Getting a key: request access without one, then claim the key once an admin has
approved. These are the only routes usable without a key; casbin still decides them
(role `anonymous`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from gateway.context import JsonBody, PublicCtx, parse
from policy import access

router = APIRouter(prefix="/api/v1")


class AccessRequestForm(BaseModel):
    """Who asks (the name becomes the principal's), how to reach them, why, and which base
    models they want."""

    model_config = ConfigDict(extra="forbid")
    name: str
    contact: str
    purpose: str
    base_models: list[str] = Field(default_factory=list)


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    claim_token: str = Field(min_length=1)


@router.post("/access_requests", name="request_access")
def request_access(ctx: PublicCtx, body: JsonBody) -> dict[str, Any]:
    ask = parse(AccessRequestForm, body)
    req, token = access.request_access(ctx.session, name=ask.name, contact=ask.contact,
                                       purpose=ask.purpose, base_models=ask.base_models)
    ctx.note(subject=req.id)
    return {"request_id": req.id, "status": req.status, "claim_token": token,
            "note": "keep the claim token: it is shown once and exchanges for your key "
                    "after approval"}


@router.post("/access_requests/claim", name="claim_access")
def claim_access(ctx: PublicCtx, body: JsonBody) -> dict[str, Any]:
    key = access.claim(ctx.session, parse(Claim, body).claim_token, ctx.state.scope_defaults)
    return {"key": key, "note": "this is the only time the key is shown"}
