"""The key lifecycle end to end: request access without a key, admin approval or
rejection, claiming the key exactly once — through the HTTP API and the CLI — with each
state's 401 message tested."""

from __future__ import annotations

import json

import httpx
import pytest
import tinker
from sqlalchemy import select

from audit.db import transaction
from audit.models import AuditEntry
from tests.api.helpers import TINY, cli_runner, service


def _post(server, path: str, key: str | None = None, **kwargs) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.post(f"{server.base_url}/api/v1/{path}", headers=headers, timeout=10, **kwargs)


def _request(server, name: str) -> dict:
    resp = _post(server, "access_requests", json={
        "name": name, "contact": f"{name}@lab.example", "purpose": "alignment research",
        "base_models": [TINY]})
    assert resp.status_code == 200, resp.text
    return resp.json()


def _as_key(server, token: str) -> httpx.Response:
    return _post(server, "client/config", token, json={})


def test_request_approve_claim_once_then_train(server):
    filed = _request(server, "ivy")
    token = filed["claim_token"]
    assert token.startswith("tml-claim-")
    assert "pending approval" in _as_key(server, token).json()["detail"]
    early = _post(server, "access_requests/claim", json={"claim_token": token})
    assert early.status_code == 401 and "pending approval" in early.json()["detail"]

    admin = server.create_key(role="admin")
    pending = httpx.get(f"{server.base_url}/api/v1/admin/access_requests?status=pending",
                        headers={"X-API-Key": admin}, timeout=10).json()["requests"]
    assert filed["request_id"] in [r["id"] for r in pending]
    approved = _post(server, f"admin/access_requests/{filed['request_id']}/approve", admin,
                     json={"role": "researcher", "scopes": {"max_lora_rank": 8}})
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert "approved: claim your key" in _as_key(server, token).json()["detail"]

    claimed = _post(server, "access_requests/claim", json={"claim_token": token})
    assert claimed.status_code == 200
    key = claimed.json()["key"]
    again = _post(server, "access_requests/claim", json={"claim_token": token})
    assert again.status_code == 401 and "already exchanged" in again.json()["detail"]
    assert "already exchanged" in _as_key(server, token).json()["detail"]

    sc = service(server, key)
    sc.create_lora_training_client(base_model=TINY, rank=4).result()
    with pytest.raises(tinker.PermissionDeniedError, match="maximum of 8"):  # the approval's
        sc.create_lora_training_client(base_model=TINY, rank=16).result()
    sc.close("success").result()
    with transaction(server.state.read_factory) as session:
        events = [e.event_type for e in session.scalars(select(AuditEntry).where(
            AuditEntry.subject == filed["request_id"]).order_by(AuditEntry.seq)).all()
            if e.event_type.startswith("access.")]
        blob = " ".join(e.payload for e in session.scalars(select(AuditEntry)).all())
    assert events == ["access.request", "access.approve", "access.claim"]
    assert token not in blob and key not in blob


def test_a_rejected_request_says_why(server):
    filed = _request(server, "jack")
    admin = server.create_key(role="admin")
    no_reason = _post(server, f"admin/access_requests/{filed['request_id']}/reject", admin,
                      json={})
    assert no_reason.status_code == 400 and "reason" in no_reason.json()["detail"]
    rejected = _post(server, f"admin/access_requests/{filed['request_id']}/reject", admin,
                     json={"reason": "purpose too vague"})
    assert rejected.status_code == 200
    for resp in (_post(server, "access_requests/claim",
                       json={"claim_token": filed["claim_token"]}),
                 _as_key(server, filed["claim_token"])):
        assert resp.status_code == 401
        assert "rejected: purpose too vague" in resp.json()["detail"]
    twice = _post(server, f"admin/access_requests/{filed['request_id']}/approve", admin)
    assert twice.status_code == 400 and "already rejected" in twice.json()["detail"]


@pytest.mark.parametrize("body, status, message", [
    ({"name": "", "contact": "x", "purpose": "y"}, 400, "name is required"),
    ({"name": "kim", "contact": "x"}, 422, "purpose: Field required"),
    ({"name": "kim", "contact": "x", "purpose": "y", "base_models": "all"}, 422,
     "base_models: Input should be a valid list"),
    ({"name": "kim", "contact": "x", "purpose": "y", "role": "admin"}, 422,
     "role: Extra inputs are not permitted"),
])
def test_malformed_access_requests_are_refused(server, body, status, message):
    resp = _post(server, "access_requests", json=body)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text


def test_names_cannot_be_taken_twice_and_unknown_tokens_are_refused(server):
    _request(server, "lea")
    dup = _post(server, "access_requests", json={"name": "lea", "contact": "c",
                                                   "purpose": "p"})
    assert dup.status_code == 400 and "already taken" in dup.json()["detail"]
    unknown = _post(server, "access_requests/claim", json={"claim_token": "tml-claim-nope"})
    assert unknown.status_code == 401 and "unknown claim token" in unknown.json()["detail"]
    assert "unknown claim token" in _as_key(server, "tml-claim-nope").json()["detail"]


def test_only_admins_decide_requests(server):
    filed = _request(server, "max")
    for role in ("researcher", "auditor"):
        key = server.create_key(role=role)
        resp = _post(server, f"admin/access_requests/{filed['request_id']}/approve", key)
        assert resp.status_code == 403
    admin = server.create_key(role="admin")
    assert _post(server, "admin/access_requests/nope/approve", admin).status_code == 404
    with pytest.raises(tinker.AuthenticationError, match="pending"):
        tinker.RestClient(base_url=server.base_url,
                          api_key=filed["claim_token"]).list_training_runs().result()


def test_the_lifecycle_through_the_cli(database_url, tmp_path):
    cli = cli_runner(database_url, tmp_path, "keys")

    token = cli("request", "--name", "nora", "--contact", "n@lab", "--purpose", "evals",
                "--base-model", TINY).stdout.strip()
    assert token.startswith("tml-claim-")
    pending = cli("claim", token)
    assert pending.returncode == 2 and "pending approval" in pending.stderr
    request_id = cli("requests", "--status", "pending").stdout.split("\t")[0]
    bad = cli("approve", request_id, "--scopes", "[1, 2]")
    assert bad.returncode == 2 and "JSON object" in bad.stderr
    assert cli("approve", request_id, "--scopes", json.dumps({"max_lora_rank": 4}),
               "--expires-in-days", "30").returncode == 0
    key = cli("claim", token)
    assert key.returncode == 0 and key.stdout.strip().startswith("tml-")
    assert not key.stdout.strip().startswith("tml-claim-")
    assert cli("claim", token).returncode == 2
    assert "claimed" in cli("requests").stdout


def test_an_approval_with_unknown_scopes_is_refused_and_the_request_stays_pending(server):
    filed = _request(server, "otto")
    admin = server.create_key(role="admin")
    bad = _post(server, f"admin/access_requests/{filed['request_id']}/approve", admin,
                json={"scopes": {"tokens_per_day": 5}})
    assert bad.status_code == 400 and "unknown scope 'tokens_per_day'" in bad.json()["detail"]
    pending = httpx.get(f"{server.base_url}/api/v1/admin/access_requests?status=pending",
                        headers={"X-API-Key": admin}, timeout=10).json()["requests"]
    assert filed["request_id"] in [r["id"] for r in pending]
