"""API keys: admins create them (an audited approval) and revoke them; revoked and
expired keys get a 401 saying which; only admins manage keys."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import httpx
import pytest
import tinker
from sqlalchemy import select

from audit.db import transaction
from audit.models import AuditEntry, utcnow
from policy.keys import authenticate, create_key
from tests.api.helpers import TINY, admin_request, cli_runner, run_cli, service


def test_an_admin_creates_and_revokes_a_key_and_the_revoked_key_gets_401(server):
    admin = server.create_key(role="admin")
    created = admin_request(server, admin, "POST", "keys",
                            json={"owner": "carol", "role": "researcher"})
    assert created.status_code == 200, created.text
    key = created.json()["key"]
    sc = service(server, key)
    sc.create_lora_training_client(base_model=TINY, rank=4).result()
    listed = admin_request(server, admin, "GET", "keys").json()["keys"]
    mine = [k for k in listed if k["owner"] == "carol"]
    assert len(mine) == 1 and mine[0]["status"] == "active" and "key" not in mine[0]
    assert key not in str(listed)

    revoked = admin_request(server, admin, "POST", f"keys/{mine[0]['id']}/revoke",
                     json={"reason": "left the project"})
    assert revoked.status_code == 200
    with pytest.raises(tinker.AuthenticationError, match="revoked"):
        tinker.RestClient(base_url=server.base_url, api_key=key).list_training_runs().result()
    again = admin_request(server, admin, "POST", f"keys/{mine[0]['id']}/revoke")
    assert again.status_code == 400 and "already revoked" in again.json()["detail"]
    with transaction(server.state.read_factory) as session:
        admin_id = authenticate(session, admin)[0].id
        events = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type.in_(["keys.create", "keys.revoke"]),
            AuditEntry.actor == admin_id).order_by(AuditEntry.seq)).all()
    assert [e.event_type for e in events] == ["keys.create", "keys.revoke"]


def test_an_expired_key_gets_401_saying_it_expired(server):
    with transaction(server.state.factory) as session:
        key = create_key(session, owner="dave", role="researcher", actor="test",
                         defaults=server.state.scope_defaults,
                         expires_at=utcnow() - dt.timedelta(seconds=1))
    resp = httpx.post(f"{server.base_url}/api/v1/client/config", json={},
                      headers={"X-API-Key": key}, timeout=10)
    assert resp.status_code == 401 and "expired" in resp.json()["detail"]


@pytest.mark.parametrize("role, can_list", [("researcher", False), ("auditor", True)])
def test_only_admins_create_or_revoke_keys(server, role, can_list):
    key = server.create_key(role=role)
    assert admin_request(server, key, "GET", "keys").status_code == (200 if can_list else 403)
    assert admin_request(server, key, "POST", "keys", json={"owner": "eve"}).status_code == 403
    assert admin_request(server, key, "POST", "keys/anything/revoke").status_code == 403


@pytest.mark.parametrize("body, status, message", [
    ({}, 422, "owner: Field required"),
    ({"owner": "  "}, 422, "owner: String should have at least 1 character"),
    ({"owner": "frank", "role": "root"}, 400, "unknown role"),
    ({"owner": "frank", "expires_in_days": 0}, 422, "expires_in_days"),
    ({"owner": "frank", "scopes": {"max_rank": 4}}, 400, "unknown scope 'max_rank'"),
    ({"owner": "frank", "scopes": {"losses": ["custom"]}}, 400, "unknown losses ['custom']"),
    ({"owner": "frank", "scopes": {"max_lora_rank": -1}}, 400, "max_lora_rank must be a whole"),
    ({"owner": "frank", "scopes": {"base_models": "all"}}, 400, "base_models must be a list"),
    ({"owner": "frank", "scopes": ["max_lora_rank"]}, 422, "scopes: Input should be a valid "
                                                            "dictionary"),
    ({"owner": "frank", "owner_name": "x"}, 422, "owner_name: Extra inputs are not permitted"),
])
def test_bad_key_requests_are_refused(server, body, status, message):
    """Schema errors (a field missing, of the wrong type or unknown) are 422s naming the
    field; values the policy refuses are 400s."""
    admin = server.create_key(role="admin")
    resp = admin_request(server, admin, "POST", "keys", json=body)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text


def test_a_key_gets_the_default_lifetime_and_scopes_unless_its_creator_overrides_them(server):
    admin = server.create_key(role="admin")
    tag = uuid.uuid4().hex[:8]
    plain = admin_request(server, admin, "POST", "keys", json={"owner": f"p-{tag}"}).json()
    short = admin_request(server, admin, "POST", "keys", json={
        "owner": f"s-{tag}", "scopes": {"expires_in_days": 7, "max_lora_rank": 2}}).json()
    defaults = server.state.scope_defaults
    lifetime = dt.datetime.fromisoformat(plain["expires_at"]) - utcnow()
    assert abs(lifetime - dt.timedelta(days=defaults.expires_in_days)) < dt.timedelta(minutes=1)
    lifetime = dt.datetime.fromisoformat(short["expires_at"]) - utcnow()
    assert abs(lifetime - dt.timedelta(days=7)) < dt.timedelta(minutes=1)
    assert plain["scopes"] == defaults.to_dict() and plain["scope_overrides"] == {}
    assert short["scopes"]["max_lora_rank"] == 2
    assert short["scopes"]["losses"] == list(defaults.losses)
    listed = {k["owner"]: k for k in admin_request(server, admin, "GET", "keys").json()["keys"]}
    assert listed[f"s-{tag}"]["scope_overrides"] == {"expires_in_days": 7, "max_lora_rank": 2}
    with pytest.raises(tinker.PermissionDeniedError, match="maximum of 2"):
        service(server, short["key"]).create_lora_training_client(
            base_model=TINY, rank=4).result()


def test_revoking_an_unknown_key_is_a_404(server):
    admin = server.create_key(role="admin")
    assert admin_request(server, admin, "POST", "keys/no-such-key/revoke").status_code == 404


def test_cli_lists_and_revokes_keys(database_url, tmp_path):
    cli = cli_runner(database_url, tmp_path, "keys")

    created = cli("create", "--role", "researcher", "--owner", "gina", "--expires-in-days", "7")
    assert created.returncode == 0 and created.stdout.startswith("tml-")
    listed = cli("list")
    assert "gina" in listed.stdout and "active" in listed.stdout
    assert created.stdout.strip() not in listed.stdout
    key_id = listed.stdout.split("\t")[0]
    assert cli("revoke", key_id, "--reason", "test").returncode == 0
    assert "revoked" in cli("list").stdout
    assert cli("revoke", key_id).returncode == 2
    assert cli("create", "--role", "researcher", "--owner", "h", "--expires-in-days",
               "0").returncode == 2
    scoped = cli("create", "--role", "researcher", "--owner", "hal", "--scopes",
                 '{"max_lora_rank": 2, "training_tokens_per_day": 10}')
    assert scoped.returncode == 0
    bad = cli("create", "--role", "researcher", "--owner", "hank", "--scopes", '{"rank": 2}')
    assert bad.returncode == 2 and "unknown scope 'rank'" in bad.stderr
    report = json.loads(run_cli(database_url, tmp_path, "usage", "--owner", "hal").stdout)
    [hal] = report["keys"]
    assert hal["today"]["training_tokens_per_day"] == 10 and report["training_runs"] == []
    assert run_cli(database_url, tmp_path, "usage", "--owner", "nobody").returncode == 2
