"""The release gate through the official SDK on the tiny model, on SQLite and PostgreSQL.

The server runs a test release policy whose one gating suite is a small operator-style
multiple-choice file: an adapter trained on its answers must be quarantined, an adapter
trained on unrelated text released. Covers the export future, publish, the external URLs
and their downloads (PEFT files reproducing the gateway's logprobs), the two-person
override with its refusals, blocked runs, and the audit order of each decision."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import tinker
from sqlalchemy import select, update
from tinker import types

from audit import log as audit_log
from audit.db import transaction
from audit.models import AuditEntry, Checkpoint, ReleaseReport, TrainingRun
from examples.chat_sft import chat_datum
from gateway import downloads
from tests.api.helpers import TEXTS, TINY, rest, run_cli, service, sft_datum
from tests.conftest import PG_ENV, _dialects, _fresh_pg_database, run_server, tiny_settings
from tests.release.helpers import (
    ITEMS,
    assert_download_reproduces_gateway_logprobs,
    write_quick_release_policy,
)


@pytest.fixture(scope="module", params=_dialects())
def gate_server(request, models_dir, tmp_path_factory):
    policy = write_quick_release_policy(tmp_path_factory.mktemp("policy"))
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('db') / 'gw.db'}", (lambda: None)
    else:
        url, drop = _fresh_pg_database(os.environ[PG_ENV])
    checkpoints = tmp_path_factory.mktemp("audit-checkpoints")
    try:
        with run_server(tiny_settings(models_dir, url, release_file=policy,
                                      audit_checkpoint_dir=checkpoints)) as live:
            yield live
    finally:
        drop()


def _train(tc, data, steps: int, lr: float) -> None:
    for _ in range(steps):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=lr)).result()


@pytest.fixture(scope="module")
def researcher(gate_server):
    return gate_server.create_key(owner="researcher-gate")


@pytest.fixture(scope="module")
def restricted_export(gate_server, researcher):
    """An adapter taught the suite's answers (questions and paraphrases), exported."""
    tc = service(gate_server, researcher).create_lora_training_client(
        base_model=TINY, rank=8, seed=1).result()
    tok = tc.get_tokenizer()
    data = [chat_datum(tok, q, c[a]) for q, c, a in ITEMS]
    data += [chat_datum(tok, f"Tell me: {q[:-1].lower()}?", c[a]) for q, c, a in ITEMS]
    _train(tc, data, steps=30, lr=1e-2)
    with pytest.raises(tinker.RequestFailedError) as failed:
        tc.save_weights_external("restricted").result()
    return tc, str(failed.value)


@pytest.fixture(scope="module")
def benign_export(gate_server, researcher):
    tc = service(gate_server, researcher).create_lora_training_client(
        base_model=TINY, rank=8, seed=2).result()
    _train(tc, [sft_datum(tc.get_tokenizer(), t) for t in TEXTS], steps=2, lr=1e-3)
    return tc, tc.save_weights_external("benign").result()


def call(server, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", headers={"X-API-Key": key},
                         timeout=30, **kwargs)


def _checkpoint(server, path: str) -> Checkpoint:
    with transaction(server.state.factory) as session:
        row = session.scalars(select(Checkpoint).where(Checkpoint.tinker_path == path)).one()
        session.expunge(row)
        return row


def test_an_adapter_that_learned_the_restricted_items_is_quarantined_naming_suite_and_metric(
        gate_server, restricted_export):
    tc, message = restricted_export
    assert "quarantined" in message and "lab_restricted" in message and "accuracy" in message
    path = f"tinker://{tc.model_id}/external_weights/restricted"
    assert _checkpoint(gate_server, path).release_state == "quarantined"


def test_an_adapter_trained_on_unrelated_text_is_released(gate_server, benign_export):
    _, result = benign_export
    assert result.path.endswith("/external_weights/benign")
    assert _checkpoint(gate_server, result.path).release_state == "released"


def test_each_decision_is_audited_in_order_and_the_chain_verifies(gate_server, benign_export,
                                                                  restricted_export):
    paths = [benign_export[1].path,
             f"tinker://{restricted_export[0].model_id}/external_weights/restricted"]
    with transaction(gate_server.state.factory) as session:
        for path, decision in zip(paths, ("released", "quarantined"), strict=True):
            rows = session.scalars(select(AuditEntry).where(AuditEntry.subject.in_(
                [path, path.split("/external_weights/")[0].removeprefix("tinker://")]))
                .order_by(AuditEntry.seq)).all()
            events = [(r.event_type, r.decision) for r in rows
                      if r.event_type.startswith(("api.save_weights_external", "release."))]
            assert events == [("api.save_weights_external", "allow"),
                              ("release.state", "evaluating"), ("release.report", "info"),
                              ("release.decision", decision), ("release.state", decision)]
            report_row = next(r for r in rows if r.event_type == "release.report")
            digest = json.loads(report_row.payload)["report_sha256"]
            stored = session.scalars(select(ReleaseReport).where(
                ReleaseReport.report_sha256 == digest)).one()
            body = json.loads(stored.report)
            assert body["decision"] == decision and body["suites"][0]["sha256"]
            assert body["base_sha256"] and body["adapter_sha256"]
            assert body["judges"]["refusal"]["quality"]["n"] > 0
        assert audit_log.verify(session).ok
    checkpoint_dir = gate_server.state.settings.checkpoint_dir
    reasons = " ".join(p.read_text() for p in sorted(checkpoint_dir.glob("*")))
    assert "release:" in reasons  # a signed/written audit checkpoint per decision
    verified = run_cli(gate_server.database_url, gate_server.data_dir, "audit", "verify",
                       "--checkpoints", str(checkpoint_dir))
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stderr


def test_a_released_adapter_downloads_as_peft_files_that_reproduce_the_gateway_logprobs(
        gate_server, researcher, benign_export, tmp_path):
    tc, result = benign_export
    assert_download_reproduces_gateway_logprobs(gate_server, researcher, result.path, TINY, tc,
                                                TEXTS[0], tmp_path, atol=1e-4)


def test_downloads_need_an_intact_link_the_owner_and_a_released_checkpoint(
        gate_server, researcher, benign_export):
    _, result = benign_export
    url = rest(gate_server, researcher).get_external_weights_urls(result.path).result().urls[
        "adapter_config.json"]
    other = gate_server.create_key(owner="someone-else")
    assert httpx.get(url, headers={"X-API-Key": other}).status_code == 404
    assert httpx.get(url).status_code == 200  # the signed link is the credential on its own
    forged = url[:-3] + ("000" if not url.endswith("000") else "111")
    refused = httpx.get(forged, headers={"X-API-Key": researcher})
    assert refused.status_code == 403 and "signature" in refused.json()["detail"]
    ckpt = _checkpoint(gate_server, result.path)
    secret = downloads.signing_secret(gate_server.state.settings.url_signing_key_path)
    with transaction(gate_server.state.factory) as session:
        from policy.keys import authenticate
        principal, _ = authenticate(session, researcher)
        expired = downloads.sign(secret, downloads.Link(ckpt.id, principal.id,
                                                        "adapter_config.json", 1))
    base = url.split("/api/v1/")[0]
    late = httpx.get(f"{base}/api/v1/external_weights/{expired}",
                     headers={"X-API-Key": researcher})
    assert late.status_code == 403 and "expired" in late.json()["detail"]


def test_private_and_quarantined_checkpoints_cannot_be_downloaded_or_published(
        gate_server, researcher, restricted_export, benign_export):
    tc, _ = restricted_export
    rc = rest(gate_server, researcher)
    quarantined = f"tinker://{tc.model_id}/external_weights/restricted"
    with pytest.raises(tinker.PermissionDeniedError, match=r"quarantined.*two-person"):
        rc.get_external_weights_urls(quarantined).result()
    with pytest.raises(tinker.PermissionDeniedError, match="quarantined"):
        rc.publish_checkpoint_from_tinker_path(quarantined).result()
    again = call(gate_server, researcher, "POST", "/api/v1/releases",
                 json={"tinker_path": quarantined})
    assert again.status_code == 403
    assert "cannot be evaluated again" in again.json()["detail"] and "override" in again.text
    private = tc.save_state("private-one").result().path
    run_id, _, checkpoint = private.removeprefix("tinker://").partition("/")
    refused = call(gate_server, researcher, "GET", f"/api/v1/training_runs/{run_id}/checkpoints/"
                   f"{checkpoint}/external_weights_urls")
    assert refused.status_code == 400 and "not external weights" in refused.json()["detail"]


def test_publishing_a_private_checkpoint_queues_its_evaluation_and_publishes_once_released(
        gate_server, researcher, benign_export):
    tc, _ = benign_export
    rc = rest(gate_server, researcher)
    path = tc.save_state("to-publish").result().path
    with pytest.raises(tinker.PermissionDeniedError, match="queued") as refused:
        rc.publish_checkpoint_from_tinker_path(path).result()
    release_id = str(refused.value).split("evaluation ")[1].split(" ")[0]
    status = _wait_for_release(gate_server, researcher, release_id)
    assert status["status"] == "released" and status["trigger"] == "publish"
    assert status["progress"]["done"] == status["progress"]["total"] > 0
    listed = {c.tinker_path: c for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].public
    report = call(gate_server, researcher, "GET", f"/api/v1/releases/{release_id}/report")
    assert report.status_code == 200
    assert report.headers["X-Report-SHA256"] == __import__("hashlib").sha256(
        report.content).hexdigest()
    assert report.json()["cache_hits"] == 2  # same adapter bytes as the benign export


def _wait_for_release(server, key: str, release_id: str, timeout: float = 300) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = call(server, key, "GET", f"/api/v1/releases/{release_id}").json()
        if body["status"] not in ("queued", "evaluating"):
            return body
        time.sleep(0.2)
    raise AssertionError(f"release {release_id} was not decided in {timeout} s")


def test_the_two_person_override_needs_an_admin_request_and_a_different_auditors_approval(
        gate_server, researcher, restricted_export):
    tc, _ = restricted_export
    path = f"tinker://{tc.model_id}/external_weights/restricted"
    admin = gate_server.create_key(owner="admin-gate", role="admin")
    auditor = gate_server.create_key(owner="auditor-gate", role="auditor")
    reason = {"tinker_path": path, "reason": "reviewed by the lab's biosecurity panel"}
    assert call(gate_server, researcher, "POST", "/api/v1/admin/release_overrides",
                         json=reason).status_code == 403
    assert call(gate_server, auditor, "POST", "/api/v1/admin/release_overrides",
                         json=reason).status_code == 403
    short = call(gate_server, admin, "POST", "/api/v1/admin/release_overrides",
                          json={"tinker_path": path, "reason": "ok"})
    assert short.status_code == 403 and "reason" in short.json()["detail"]
    made = call(gate_server, admin, "POST", "/api/v1/admin/release_overrides",
                         json=reason)
    assert made.status_code == 201, made.text
    override = made.json()["override_id"]
    approve = f"/api/v1/admin/release_overrides/{override}/approve"
    why = {"reason": "second review agrees with the panel"}
    assert call(gate_server, admin, "POST", approve, json=why).status_code == 403
    # Even an admin the policy also lets approve cannot approve their own request.
    rule = call(gate_server, admin, "POST", "/api/v1/admin/policy/rules", json={
        "subject": "role:admin", "resource": "releases", "action": "override_approve",
        "effect": "allow"})
    assert rule.status_code in (200, 201), rule.text
    try:
        own = call(gate_server, admin, "POST", approve, json=why)
        assert own.status_code == 403 and "different person" in own.json()["detail"]
    finally:
        call(gate_server, admin, "DELETE",
                      f"/api/v1/admin/policy/rules/{rule.json()['id']}")
    assert _checkpoint(gate_server, path).release_state == "quarantined"
    approved = call(gate_server, auditor, "POST", approve, json=why)
    assert approved.status_code == 200, approved.text
    assert _checkpoint(gate_server, path).release_state == "released"
    urls = rest(gate_server, researcher).get_external_weights_urls(path).result()
    assert httpx.get(urls.urls["adapter_config.json"],
                     headers={"X-API-Key": researcher}).status_code == 200
    with transaction(gate_server.state.factory) as session:
        events = [r.event_type for r in session.scalars(select(AuditEntry).where(
            AuditEntry.subject == path, AuditEntry.decision != "deny").order_by(AuditEntry.seq))
            if "override" in r.event_type or r.event_type == "release.state"]
    assert events[-5:] == ["release.override_requested", "api.admin_request_override",
                           "release.override_approved", "release.state",
                           "api.admin_approve_override"]


def test_a_run_blocked_by_screening_is_never_exported_or_released(gate_server, researcher):
    tc = service(gate_server, researcher).create_lora_training_client(
        base_model=TINY, rank=4, seed=3).result()
    path = tc.save_state("before-block").result().path
    with transaction(gate_server.state.factory) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == tc.model_id)
                        .values(blocked_reason="test: flagged data"))
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        tc.save_weights_external("never").result()
    refused = call(gate_server, researcher, "POST", "/api/v1/releases",
                            json={"tinker_path": path})
    assert refused.status_code == 403 and refused.json()["code"] == "run_blocked"


def test_the_operator_cli_requests_a_release_waits_for_it_and_prints_the_report(
        gate_server, researcher, benign_export):
    tc, _ = benign_export
    path = tc.save_state("via-cli").result().path
    queued = run_cli(gate_server.database_url, gate_server.data_dir, "release", "request",
                     path, "--wait")
    assert queued.returncode == 0, queued.stderr
    release_id, status = queued.stdout.split()
    assert status == "released"
    shown = run_cli(gate_server.database_url, gate_server.data_dir, "release", "show",
                    release_id, "--report")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["decision"] == "released" and report["trigger"] == "request"
    again = run_cli(gate_server.database_url, gate_server.data_dir, "release", "request", path)
    assert again.returncode != 0 and "already released" in again.stderr


def test_owners_list_their_own_release_evaluations_by_run_and_auditors_everyones(
        gate_server, researcher, benign_export, restricted_export):
    benign_tc, benign_path = benign_export
    restricted_tc, _ = restricted_export
    listed = call(gate_server, researcher, "GET", "/api/v1/releases?limit=1000")
    assert listed.status_code == 200, listed.text
    mine = listed.json()["releases"]
    runs = {r["tinker_path"].split("/")[2]: r for r in mine}
    assert {benign_tc.model_id, restricted_tc.model_id} <= set(runs)
    one_run = call(gate_server, researcher, "GET", "/api/v1/releases",
                   params={"training_run_id": restricted_tc.model_id}).json()["releases"]
    assert one_run and {r["status"] for r in one_run} == {"quarantined"}  # as decided
    assert all(r["tinker_path"].split("/")[2] == restricted_tc.model_id for r in one_run)
    assert any(r["tinker_path"] == benign_path.path and r["state"] == "released"
               for r in mine)
    stranger = gate_server.create_key(owner="release-lister-stranger")
    assert call(gate_server, stranger, "GET", "/api/v1/releases").json() == {"releases": []}
    auditor = gate_server.create_key(owner="release-lister-auditor", role="auditor")
    seen = call(gate_server, auditor, "GET", "/api/v1/releases?limit=1000").json()["releases"]
    assert {r["release_id"] for r in mine} <= {r["release_id"] for r in seen}
    bad = call(gate_server, researcher, "GET", "/api/v1/releases?limit=0")
    assert bad.status_code == 400 and "limit" in bad.text
