"""Auditors query and export the trail over HTTP (and the SDK's AdminClient reads the
Tinker-shaped day view); researchers cannot. The running gateway writes checkpoints of
the head outside the database on its timer, and the log verifies against them."""

from __future__ import annotations

import datetime as dt
import json
import time

import httpx
import pytest
import tinker

from audit import anchors, query
from audit import log as audit_log
from audit.db import transaction
from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.conftest import run_server, tiny_settings


def entries(server, key: str, **params) -> httpx.Response:
    return httpx.get(f"{server.base_url}/api/v1/audit/entries", params=params,
                     headers={"X-API-Key": key}, timeout=10)


@pytest.fixture
def trained(server):
    """A researcher's key, run id and key id after one training step."""
    key = server.create_key()
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    trainer.forward_backward([sft_datum(trainer.get_tokenizer(), TEXTS[0])],
                             "cross_entropy").result()
    [mine] = httpx.get(f"{server.base_url}/api/v1/usage", headers={"X-API-Key": key},
                       timeout=10).json()["keys"]
    yield key, trainer.model_id, mine["key_id"]
    sc.close("success").result()


def test_auditors_filter_by_key_run_event_decision_and_time(server, trained):
    key, run_id, key_id = trained
    auditor = server.create_key(role="auditor")
    by_key = entries(server, auditor, api_key_id=key_id, limit=1000).json()["entries"]
    assert {e["event_type"] for e in by_key} >= {"api.create_model", "api.forward_backward"}
    assert all(json.loads(e["payload"])["api_key_id"] == key_id for e in by_key)
    by_run = entries(server, auditor, training_run=run_id, event_type="engine.forward_backward"
                     ).json()["entries"]
    assert [e["subject"] for e in by_run] == [run_id]
    actor = by_key[0]["actor"]
    denied = entries(server, auditor, actor=actor, decision="deny").json()["entries"]
    assert denied == []
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert entries(server, auditor, api_key_id=key_id, since=future).json()["entries"] == []
    until = entries(server, auditor, api_key_id=key_id, until=future).json()["entries"]
    assert until == by_key[:100]
    bad = entries(server, auditor, since="yesterday")
    assert bad.status_code == 400 and "ISO 8601" in bad.json()["detail"]
    assert entries(server, key).status_code == 403  # researchers do not read the trail


def test_pages_follow_the_cursor_and_an_export_verifies_offline(server, trained):
    key_id = trained[2]
    auditor = server.create_key(role="auditor")
    seen, after = [], 0
    while True:
        page = entries(server, auditor, api_key_id=key_id, limit=2, after_seq=after).json()
        seen += [e["seq"] for e in page["entries"]]
        if page["next_after_seq"] is None:
            break
        after = page["next_after_seq"]
    assert seen == sorted(seen) and len(seen) == len(set(seen)) >= 3
    export = httpx.get(f"{server.base_url}/api/v1/audit/export", headers={"X-API-Key": auditor},
                       timeout=30)
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = export.text.splitlines()
    result = query.verify_export(lines)
    assert result.ok and result.first_seq == 1 and result.linked == result.entries - 1
    tampered = json.loads(lines[5])
    tampered["decision"] = "deny"
    lines[5] = json.dumps(tampered)
    assert query.verify_export(lines).bad_seq == tampered["seq"]


def test_the_sdk_admin_client_reads_a_day_of_the_trail(server, trained):
    auditor = server.create_key(role="auditor")
    admin_client = tinker.AdminClient(base_url=server.base_url, api_key=auditor)
    today = admin_client.get_audit_log(day=dt.datetime.now(dt.UTC).date()).result()
    assert any(e.event == "api.create_model" for e in today.entries)
    assert all("entry_hash" in e.event_details for e in today.entries)
    saves = admin_client.get_audit_log(event_type="checkpoints").result()
    assert all("weights" in e.event or "checkpoint" in e.event for e in saves.entries)
    old = admin_client.get_audit_log(day=dt.date(2020, 1, 1)).result()
    assert old.entries == []


def test_the_gateway_checkpoints_its_head_on_a_timer(models_dir, database_url, tmp_path):
    settings = tiny_settings(models_dir, database_url, run_worker=False,
                             audit_checkpoint_seconds=0.2,
                             audit_checkpoint_dir=tmp_path / "ckpts")
    with run_server(settings) as server:
        key = server.create_key()
        httpx.post(f"{server.base_url}/api/v1/client/config", headers={"X-API-Key": key},
                   timeout=10)
        deadline = time.monotonic() + 10
        while not list((tmp_path / "ckpts").glob("checkpoint-*.json")):
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        with transaction(server.state.read_factory) as session:
            checkpoints = anchors.read_checkpoints(tmp_path / "ckpts")
            result = audit_log.verify(session, checkpoints=checkpoints)
    assert result.ok and result.checkpoints >= 1
    assert checkpoints[-1].reason in ("timer", "shutdown")
