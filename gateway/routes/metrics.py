"""GET /metrics: the Prometheus text exposition, for the principals the policy lets read
metrics (admins and auditors by default; resource "metrics", action "read").

Each scrape is an ordinary request: authenticated, authorized and audited (one row).
Prometheus scraping every few seconds is better pointed at the separate bind
(`LORAGATE_METRICS_BIND`, gateway.metrics), which serves the same text without a key.
Must not compute metrics (gateway.metrics and gateway.deployment_metrics do)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import metrics
from gateway.context import Ctx

router = APIRouter()


@router.get("/metrics", name="metrics")
def read_metrics(ctx: Ctx) -> Response:
    """Read on the read-only engine; the request's own session only writes its audit row."""
    body = metrics.render(ctx.state.metrics_registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
