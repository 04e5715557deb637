"""Getting a key: request access without one, then claim the key once an admin has
approved. These are the only routes usable without a key; casbin still decides them
(role `anonymous`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.context import JsonBody, PublicCtx
from gateway.errors import BadRequest
from policy import access

router = APIRouter(prefix="/api/v1")


@router.post("/access_requests", name="request_access")
def request_access(ctx: PublicCtx, body: JsonBody) -> dict[str, Any]:
    models = body.get("base_models", [])
    texts = {k: body.get(k) for k in ("name", "contact", "purpose")}
    if not all(isinstance(v, str) for v in texts.values()) or not isinstance(models, list):
        raise BadRequest("send name, contact and purpose as strings and base_models as a list")
    req, token = access.request_access(ctx.session, base_models=models, **texts)  # type: ignore[arg-type]
    ctx.note(subject=req.id)
    return {"request_id": req.id, "status": req.status, "claim_token": token,
            "note": "keep the claim token: it is shown once and exchanges for your key "
                    "after approval"}


@router.post("/access_requests/claim", name="claim_access")
def claim_access(ctx: PublicCtx, body: JsonBody) -> dict[str, Any]:
    token = body.get("claim_token")
    if not isinstance(token, str) or not token:
        raise BadRequest("claim_token is required")
    key = access.claim(ctx.session, token, ctx.state.scope_defaults)
    return {"key": key, "note": "this is the only time the key is shown"}
