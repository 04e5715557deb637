"""Putting a job into the queue: `enqueue` is the one function that adds a pending future
row (audit.models.Future), for the gateway's admission (every data-bearing request) and
for the release evaluations the gateway and the operator CLI ask for. The worker claims
what it writes (engine.worker).

Owns the shape of a new queue row only; must not check policy, quotas or resubmits (the
callers' admission does) or import fastapi.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from audit.models import Future


def enqueue(session: Session, *, kind: str, payload: bytes, principal_id: str,
            request_format: str = "json", model_id: str | None = None,
            sampler_id: str | None = None, seq_id: int | None = None,
            api_key_id: str | None = None, quota_reservation: str | None = None) -> Future:
    """Add a pending future for `kind` with `payload` (flushed: its request_id is set)."""
    future = Future(request_id=f"fut-{uuid.uuid4().hex}", principal_id=principal_id,
                    kind=kind, model_id=model_id, sampler_id=sampler_id, seq_id=seq_id,
                    status="pending", request_format=request_format, request_payload=payload,
                    api_key_id=api_key_id, quota_reservation=quota_reservation)
    session.add(future)
    session.flush()
    return future
