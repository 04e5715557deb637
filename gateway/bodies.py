"""Request bodies: read only once the caller is known, never more bytes than the settings
allow, and parsed as JSON objects.

Routes take their body through `JsonBody`/`OptionalJsonBody` (a dependency declared after
the request context, which authenticates), or read it with `read_body` after their
context; FastAPI itself never reads a body before the API key is checked. A declared or
streamed body over `Settings.max_request_bytes` is a 413 before more of it is read.
Decompression bounds are the wire layer's (engine.wire.decompress_body).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request

from gateway.errors import PayloadTooLarge, Unprocessable

# Set on request.state by the request contexts once the caller is authenticated (or known
# to be anonymous on a public route).
CALLER_CHECKED = "caller_checked"


async def read_body(request: Request) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed the limit."""
    if not getattr(request.state, CALLER_CHECKED, False):
        # A route that reads its body before its context would parse unauthenticated input.
        raise RuntimeError(f"{request.url.path} reads its body before authenticating")
    limit: int = request.app.state.loragate.settings.max_request_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"request body of {declared} bytes", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large("request body", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"{what} exceeds the limit of {limit} bytes; split the request "
                           "into smaller calls")


async def _json(request: Request) -> Any:
    raw = await read_body(request)
    if not raw:
        return None
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise Unprocessable(f"invalid request: body: send JSON with Content-Type: "
                            f"application/json (got {kind or 'no content type'})")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unprocessable(f"invalid request: body: malformed JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Unprocessable("invalid request: body: send a JSON object")
    return value


async def json_object(request: Request) -> dict[str, Any]:
    value = await _json(request)
    if value is None:
        raise Unprocessable("invalid request: body: a JSON object is required")
    return value  # type: ignore[no-any-return]


async def optional_json_object(request: Request) -> dict[str, Any] | None:
    return await _json(request)  # type: ignore[no-any-return]


JsonBody = Annotated[dict[str, Any], Depends(json_object)]
OptionalJsonBody = Annotated[dict[str, Any] | None, Depends(optional_json_object)]
