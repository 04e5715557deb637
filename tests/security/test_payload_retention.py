"""Raw text does not live forever, on SQLite and PostgreSQL.

The futures table holds every request's payload (training tokens, prompts) and every
result (logprobs, samples). Once the owner has retrieved a result, both are purged; a
result never retrieved is purged after the retention (`payload_retention_days`, 7 by
default) by the server's periodic purge or `loragate futures purge`. The SHA-256 of each
purged payload stays in the audit trail (one `futures.purged` row per purge batch, the
request's equal to the digest its admission recorded). A retrieve after the purge, or a
resubmit of the purged request, is a 410 that says so."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from tinker import types

from audit.db import transaction
from audit.models import AuditEntry, Future
from gateway.settings import Settings
from tests.api.helpers import TEXTS, TINY, run_cli, service, sft_datum
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import module_server

PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with module_server(request.param, models_dir,
                       tmp_path_factory.mktemp("retention")) as live:
        yield live


def _post(server: LiveServer, key: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/{route}", json=body,
                      headers={"X-API-Key": key}, timeout=30)


def _row(server: LiveServer, request_id: str) -> Future:
    with transaction(server.state.read_factory) as session:
        row = session.get(Future, request_id)
        session.expunge(row)
        return row


def _futures_of(server: LiveServer, kind: str, **where: str) -> list[str]:
    with transaction(server.state.read_factory) as session:
        return list(session.scalars(select(Future.request_id).filter_by(kind=kind, **where)
                                    .order_by(Future.created_at)))


def _wait(server: LiveServer, request_id: str, done) -> Future:
    deadline = time.monotonic() + 30
    while True:
        row = _row(server, request_id)
        if done(row) or time.monotonic() > deadline:
            return row
        time.sleep(0.05)


def _purge_rows(server: LiveServer, request_id: str) -> list[dict]:
    """The purge audit entries naming `request_id`, as their listed futures."""
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "futures.purged")).all()
        payloads = [json.loads(r.payload) for r in rows]
    return [{**p, "entry": f} for p in payloads for f in p["futures"]
            if f["request_id"] == request_id]


def _admitted_sha256(server: LiveServer, request_id: str) -> str:
    """The content digest the request's admission recorded in the audit trail."""
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type.like("api.%"), AuditEntry.decision == "allow")).all()
    [digest] = [json.loads(r.payload)["content_sha256"] for r in rows
                if json.loads(r.payload).get("future") == request_id]
    return digest


def _purged(row: Future) -> bool:
    return row.request_format == "purged"


def test_a_delivered_result_and_its_request_are_purged_keeping_their_hashes(server):
    key = server.create_key()
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tok = trainer.get_tokenizer()
    trainer.forward_backward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    sampler.sample(types.ModelInput.from_ints(tok.encode(TEXTS[1])), 1,
                   types.SamplingParams(max_tokens=4, stop=[])).result()
    [fb] = _futures_of(server, "forward_backward", model_id=trainer.model_id)
    [sample] = _futures_of(server, "sample", sampler_id=sampler._sampling_session_id)
    for request_id in (fb, sample):
        row = _wait(server, request_id, _purged)
        assert (row.request_payload, row.result_payload) == (b"", None), request_id
        assert row.result_format == "delivered"
        [purge] = _purge_rows(server, request_id)
        assert purge["reason"] == "delivered"
        assert purge["entry"]["request_sha256"] == _admitted_sha256(server, request_id)
        assert len(purge["entry"]["result_sha256"]) == 64
        again = _post(server, key, "retrieve_future", {"request_id": request_id})
        assert again.status_code == 410, again.text
        assert again.json()["code"] == "purged"
        assert "delivered" in again.json()["detail"] and "purged" in again.json()["detail"]
    with transaction(server.state.read_factory) as session:
        stored = b"".join(p or b"" for p in session.scalars(select(Future.request_payload)))
    assert TEXTS[0].encode() not in stored
    sc.close("success").result()


def test_another_principal_still_gets_404_for_a_purged_future(server):
    key = server.create_key()
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    [created] = _futures_of(server, "create_model", model_id=trainer.model_id)
    _wait(server, created, _purged)
    resp = _post(server, server.create_key(), "retrieve_future", {"request_id": created})
    assert resp.status_code == 404, resp.text
    sc.close("success").result()


def test_an_unretrieved_result_is_purged_after_the_retention(server, tmp_path):
    assert Settings().payload_retention_days == 7
    key = server.create_key()
    sc = service(server, key)
    base = sc.create_sampling_client(base_model=TINY).result()
    body = types.SampleRequest(sampling_session_id=base._sampling_session_id, seq_id=0,
                               num_samples=1, prompt=PROMPT,
                               sampling_params=types.SamplingParams(max_tokens=2))
    submitted = _post(server, key, "asample", body.model_dump(mode="json", exclude_none=True))
    request_id = submitted.json()["request_id"]
    row = _wait(server, request_id, lambda r: r.status == "done")
    assert row.status == "done" and not _purged(row)  # finished, never retrieved
    from audit.retention import purge_expired

    assert purge_expired(server.state.factory, retention_days=7, actor="test") == []
    assert not _purged(_row(server, request_id))  # within the retention: kept
    out = run_cli(server.database_url, tmp_path, "futures", "purge", "--retention-days", "0")
    assert out.returncode == 0, out.stderr
    assert request_id in out.stdout
    row = _row(server, request_id)
    assert _purged(row) and row.result_format == "expired"
    assert (row.request_payload, row.result_payload) == (b"", None)
    [purge] = _purge_rows(server, request_id)
    assert purge["reason"] == "retention" and purge["retention_days"] == 0
    assert purge["entry"]["request_sha256"] == _admitted_sha256(server, request_id)
    resp = _post(server, key, "retrieve_future", {"request_id": request_id})
    assert resp.status_code == 410, resp.text
    assert "not retrieved within" in resp.json()["detail"]
    sc.close("success").result()


ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-12,
        "weight_decay": 0.0, "grad_clip_norm": 0.0}


def test_a_resubmit_of_a_purged_request_is_refused_clearly(server):
    key = server.create_key()
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    body = {"model_id": trainer.model_id, "seq_id": 700, "type": "optim_step",
            "adam_params": ADAM}
    first = _post(server, key, "optim_step", body)
    assert first.status_code == 200, first.text
    request_id = first.json()["request_id"]
    assert _post(server, key, "retrieve_future", {"request_id": request_id}).status_code == 200
    _wait(server, request_id, _purged)
    again = _post(server, key, "optim_step", body)
    assert again.status_code == 410, again.text
    assert f"seq_id 700 of {trainer.model_id}" in again.json()["detail"]
    assert "purged" in again.json()["detail"]
    sc.close("success").result()
