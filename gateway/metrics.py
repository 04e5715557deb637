"""Prometheus metrics of the HTTP API, and what /metrics serves.

Owns the per-request metrics of this process (requests and latency per method, route
template and status: the template, never the raw path, so the labels stay bounded; a path
no route matches is `unmatched`), the scrape registry (this process's own metrics from
prometheus_client's default registry — these, audit.metrics, policy.screening.metrics,
gateway.counters and the Python process collectors — plus the deployment-wide values read
from the database, gateway.deployment_metrics) and the optional separate bind that serves
them without a key on a private network. Must not decide anything and must not query the
database itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.counters import REFUSAL_AUDIT_FAILURES
from gateway.deployment_metrics import DeploymentCollector

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "unmatched"
# Long polls of retrieve_future are answered within the poll window (25 s by default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

HTTP_REQUESTS = Counter(
    "loragate_http_requests", "HTTP requests answered by this API process, per method, "
    "route template and status", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "loragate_http_request_duration_seconds", "Seconds from a request's arrival to the end "
    "of its response in this API process (long polls included), per method, route "
    "template and status", ["method", "route", "status"], buckets=LATENCY_BUCKETS)


class HttpMetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request; a request whose handler
    raised counts as the 500 it is answered with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            observe_request(scope, status, time.perf_counter() - started)


def observe_request(scope: Scope, status: int, seconds: float) -> None:
    method = scope.get("method", "")
    labels = {"method": method if method in METHODS else "other", "route": route_label(scope),
              "status": str(status)}
    HTTP_REQUESTS.labels(**labels).inc()
    HTTP_SECONDS.labels(**labels).observe(seconds)


def route_label(scope: Scope) -> str:
    """The matched route's path template (set by the router on the scope), or UNMATCHED."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RefusalAuditFailures:
    """gateway.counters' count of refusals whose audit row was lost, as a metric."""

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "loragate_refusal_audit_failures", "Refused requests in this API process whose "
            "audit row could not be written even after retries (each is also logged)")
        family.add_metric([], REFUSAL_AUDIT_FAILURES.value)
        return [family]


REGISTRY.register(RefusalAuditFailures())


class ProcessMetrics:
    """This process's metrics: everything on prometheus_client's default registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def scrape_registry(read_factory: sessionmaker[Session]) -> CollectorRegistry:
    """What the API's /metrics (and its separate bind) serves: this process's metrics and
    the deployment's, read from the database at each scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessMetrics())
    registry.register(DeploymentCollector(read_factory))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of `registry`."""
    return generate_latest(registry)


def parse_bind(bind: str) -> tuple[str, int]:
    """"HOST:PORT" (an IPv6 host in brackets) as (host, port)."""
    host, _, port = bind.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"a metrics bind must be HOST:PORT, e.g. 10.0.0.5:9464; got {bind!r}")
    return host, int(port)


def serve_metrics(bind: str, registry: CollectorRegistry = REGISTRY) -> WSGIServer:
    """Serve `registry` without a key at http://HOST:PORT/ (any path) from a daemon thread:
    for a private network only. Returns the server (`shutdown()` stops it)."""
    host, port = parse_bind(bind)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
