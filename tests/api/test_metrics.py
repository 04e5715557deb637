"""The Prometheus metrics, scraped over HTTP on SQLite and PostgreSQL: GET /metrics for
admins and auditors (a researcher gets 403, no key 401), per-route HTTP counters labelled
by route template, the queue and job times read from the database, screening flags per
category, audit append timings; and the separate keyless bind of an API whose worker is a
process of its own, where the database-read values still show that worker's jobs."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import tinker
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import select

from audit.db import transaction
from audit.models import AuditEntry, Future, Principal, utcnow
from gateway.deployment_metrics import JOB_KINDS, DeploymentCollector
from gateway.embedded import free_port
from gateway.metrics import parse_bind
from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.api.test_screening_sdk import BENIGN, cipher
from tests.conftest import run_server, tiny_settings

FORWARD_BACKWARD = "/api/v1/forward_backward"


def parse(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def scrape(base_url: str, key: str | None) -> list[Sample]:
    headers = {"X-API-Key": key} if key else {}
    resp = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def labels_of(samples: list[Sample], name: str, label: str) -> set[str]:
    return {s.labels[label] for s in samples if s.name == name}


@pytest.fixture
def keys(server) -> dict[str, str]:
    return {role: server.create_key(role=role) for role in ("admin", "auditor", "researcher")}


def test_admins_and_auditors_see_the_traffic_researchers_and_nobody_do_not(server, keys):
    before = scrape(server.base_url, keys["admin"])
    sc = service(server, keys["researcher"])
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    tok = tc.get_tokenizer()
    batch = [sft_datum(tok, text) for text in TEXTS]
    tc.forward_backward(batch, "cross_entropy").result()
    ciphered = [sft_datum(tok, cipher(f"{u} {a}")) for u, a in BENIGN[:3]]
    with pytest.raises(tinker.PermissionDeniedError, match=r"structural\.encoded_text"):
        tc.forward_backward(ciphered, "cross_entropy").result()
    assert httpx.get(f"{server.base_url}/no/such/{uuid.uuid4().hex}", timeout=10
                     ).status_code == 404
    assert httpx.get(f"{server.base_url}/api/v1/training_runs/{tc.model_id}", timeout=10,
                     headers={"X-API-Key": keys["researcher"]}).status_code == 200
    sc.close("success").result()

    for role in ("admin", "auditor"):
        after = scrape(server.base_url, keys[role])
        moved = {name: value(after, name, **labels) - value(before, name, **labels)
                 for name, labels in MOVED.items()}
        assert all(delta >= 1 for delta in moved.values()), moved
        assert value(after, "loragate_tokens_total", kind="trained") - value(
            before, "loragate_tokens_total", kind="trained") >= sum(
            len(d.model_input.to_ints()) for d in batch)
        assert labels_of(after, "loragate_queue_depth", "kind") >= set(JOB_KINDS)
        assert labels_of(after, "loragate_queue_depth", "status") == {"pending", "running"}
        assert value(after, "loragate_job_run_seconds_recent_mean", kind="forward_backward") > 0
        assert labels_of(after, "loragate_release_decisions_total", "decided_by") == {
            "gate", "override"}
        assert value(after, "loragate_deployment_metrics_up") == 1
        routes = labels_of(after, "loragate_http_requests_total", "route")
        assert {"unmatched", "/api/v1/training_runs/{run_id}"} <= routes  # templates only
        assert not any("/no/such/" in r or tc.model_id in r for r in routes)


# Samples that must have grown by at least one between the scrapes around the traffic.
MOVED: dict[str, dict[str, str]] = {
    "loragate_http_requests_total": {"route": FORWARD_BACKWARD, "method": "POST",
                                     "status": "200"},
    "loragate_http_request_duration_seconds_count": {"route": FORWARD_BACKWARD,
                                                     "status": "403"},
    "loragate_jobs_recent_finished": {"kind": "forward_backward", "status": "done"},
    "loragate_screening_flags_total": {"source": "training",
                                       "category": "structural.encoded_text"},
    "loragate_screening_refusals_total": {},
    "loragate_audit_append_seconds_count": {},
}


def test_only_admins_and_auditors_may_read_metrics(server, keys):
    resp = httpx.get(f"{server.base_url}/metrics", timeout=10,
                     headers={"X-API-Key": keys["researcher"]})
    assert resp.status_code == 403 and resp.json()["code"] and resp.json()["request_id"]
    resp = httpx.get(f"{server.base_url}/metrics", timeout=10)
    assert resp.status_code == 401 and resp.json()["code"] and resp.json()["request_id"]


def test_a_separate_bind_shows_the_work_of_a_separate_worker_process(models_dir,
                                                                     database_url):
    """The API runs no worker; the worker process's jobs and tokens still appear in the
    API's (keyless) metrics, read from the database; the worker's own bind serves that
    process's in-process metrics (its audit appends) and no database-read ones."""
    api_bind, worker_bind = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    settings = tiny_settings(models_dir, database_url, run_worker=False, metrics_bind=api_bind)
    with run_server(settings) as server:
        worker = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker", "--worker-id", "w-metrics",
             "--base-model", TINY, "--data-dir", str(models_dir), "--metrics-bind",
             worker_bind], env={**os.environ, "LORAGATE_DATABASE_URL": database_url},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            sc = service(server, server.create_key())
            tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
            tc.forward_backward([sft_datum(tc.get_tokenizer(), TEXTS[0])],
                                "cross_entropy").result()
            sc.close("success").result()
            api = scrape(f"http://{api_bind}", None)
            own = scrape_when_up(f"http://{worker_bind}")
            assert start_row(server)["metrics_bind"] == api_bind  # a keyless port, audited
        finally:
            worker.terminate()
            _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err[-2000:]
    assert value(api, "loragate_jobs_recent_finished", kind="forward_backward",
                 status="done") == 1
    assert value(api, "loragate_tokens_total", kind="trained") > 0
    assert value(own, "loragate_audit_append_seconds_count") > 0  # engine.* rows
    assert not labels_of(own, "loragate_queue_depth", "kind")


def start_row(server) -> dict:
    with transaction(server.state.read_factory) as session:
        row = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "gateway.start").order_by(AuditEntry.seq.desc())).first()
    return json.loads(row.payload)


def scrape_when_up(base_url: str, timeout: float = 60) -> list[Sample]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return scrape(base_url, None)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_queue_and_job_times_are_computed_in_sql_on_both_databases(factory):
    """Exact values from futures with known timestamps: the queue by kind and status, and
    the means over the recent jobs only (one finished long ago is left out)."""
    now = utcnow()
    with transaction(factory) as session:
        session.add(Principal(id="p-metrics", name="metrics", role="researcher"))
        session.flush()
        for i, (status, queued, waited, ran) in enumerate([
                ("pending", 1, None, None), ("running", 5, 1, None), ("done", 60, 2, 1),
                ("failed", 30, 4, 3), ("done", 7200, 1, 100)]):
            created = now - dt.timedelta(seconds=queued)
            claimed = created + dt.timedelta(seconds=waited) if waited is not None else None
            session.add(Future(request_id=f"fut-{i}", principal_id="p-metrics", kind="sample",
                               status=status, request_payload=b"", created_at=created,
                               claimed_at=claimed, finished_at=claimed + dt.timedelta(
                                   seconds=ran) if ran is not None else None))
    samples = [s for family in DeploymentCollector(factory).collect() for s in family.samples]
    assert value(samples, "loragate_queue_depth", kind="sample", status="pending") == 1
    assert value(samples, "loragate_queue_depth", kind="sample", status="running") == 1
    assert value(samples, "loragate_jobs_recent_finished", kind="sample", status="done") == 1
    assert value(samples, "loragate_jobs_recent_finished", kind="sample", status="failed") == 1
    assert value(samples, "loragate_job_run_seconds_recent_mean",
                 kind="sample") == pytest.approx(2.0, abs=1e-3)
    assert value(samples, "loragate_job_wait_seconds_recent_mean",
                 kind="sample") == pytest.approx(3.0, abs=1e-3)
    assert value(samples, "loragate_deployment_metrics_up") == 1


@pytest.mark.parametrize("bind", ["9464", "host:", ":9464", "host:99999", "host:port"])
def test_a_malformed_metrics_bind_is_refused(bind):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind(bind)
    assert parse_bind("[::1]:9464") == ("::1", 9464)
