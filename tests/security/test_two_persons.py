"""The two-person rule needs two real persons, on SQLite and PostgreSQL.

The red team's cases: an admin minted an auditor key under a fresh name and approved the
admin's own override; an admin minted a researcher key under an existing owner's name
and read that owner's results; an access request took a name that `keys create --owner`
later joined silently. The invariants (policy.keys, policy.persons): a key for an
existing principal is added only by the explicit, audited "add key to principal" action
(API and CLI), never by naming an owner; a name that exists or is pending cannot be taken
again; an approval does not count when the requesting admin enrolled the approver
(created its key, approved its access request, added the key it used) or when one admin
enrolled both; the audit trail records who enrolled every principal and issued every key.

The people the operator enrolls (`server.create_key`, the CLI) are the roots of trust.
Quarantines are set directly: the gate's own tests train adapters it quarantines.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from audit.db import transaction
from audit.models import AuditEntry, Checkpoint
from policy.keys import authenticate
from tests.api.helpers import TINY, rest, run_cli, service
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import AGREE, REASON, gate_server


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with gate_server(request, models_dir, tmp_path_factory, "persons") as live:
        yield live


@pytest.fixture(scope="module")
def trainer(server: LiveServer):
    key = server.create_key(scopes={"checkpoints_stored": 200})
    return service(server, key).create_lora_training_client(base_model=TINY, rank=4).result()


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def call(server: LiveServer, key: str | None, method: str, path: str, **kwargs
         ) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.request(method, f"{server.base_url}/api/v1/{path}", headers=headers,
                         timeout=30, **kwargs)


def _quarantined(server: LiveServer, trainer) -> str:
    path = trainer.save_state(name("q")).result().path
    with transaction(server.state.factory) as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                        .values(release_state="quarantined"))
    return path


def _override(server: LiveServer, admin: str, path: str) -> str:
    made = call(server, admin, "POST", "admin/release_overrides",
                json={"tinker_path": path, "reason": REASON})
    assert made.status_code == 201, made.text
    return f"admin/release_overrides/{made.json()['override_id']}/approve"


def _state(server: LiveServer, path: str) -> str:
    with transaction(server.state.read_factory) as session:
        return session.scalars(select(Checkpoint.release_state).where(
            Checkpoint.tinker_path == path)).one()


def _minted(server: LiveServer, admin: str, role: str) -> str:
    made = call(server, admin, "POST", "admin/keys", json={"owner": name(role), "role": role})
    assert made.status_code == 200, made.text
    return str(made.json()["key"])


def _claimed(server: LiveServer, admin: str, role: str, who: str | None = None) -> str:
    filed = call(server, None, "POST", "access_requests", json={
        "name": who or name(role), "contact": "x@lab.example", "purpose": "reviews",
        "base_models": [TINY]}).json()
    approved = call(server, admin, "POST", f"admin/access_requests/{filed['request_id']}/approve",
                    json={"role": role})
    assert approved.status_code == 200, approved.text
    claimed = call(server, None, "POST", "access_requests/claim",
                   json={"claim_token": filed["claim_token"]})
    assert claimed.status_code == 200, claimed.text
    return str(claimed.json()["key"])


def _principal_name(server: LiveServer, key: str) -> str:
    with transaction(server.state.read_factory) as session:
        return authenticate(session, key)[0].name


def authenticate_id(server: LiveServer, key: str) -> str:
    with transaction(server.state.read_factory) as session:
        return authenticate(session, key)[0].id


def test_an_admin_cannot_approve_their_own_override_with_keys_they_issued(server, trainer):
    admin = server.create_key(role="admin")
    auditor = server.create_key(role="auditor")  # a real, independently enrolled person
    path = _quarantined(server, trainer)
    approve = _override(server, admin, path)
    minted = _minted(server, admin, "auditor")
    claimed = _claimed(server, admin, "auditor")
    added = call(server, admin, "POST", "admin/principal_keys", json={
        "principal": _principal_name(server, auditor), "reason": "rotating the auditor's key"})
    assert added.status_code == 200, added.text
    for key in (minted, claimed, added.json()["key"]):
        refused = call(server, key, "POST", approve, json=AGREE)
        assert refused.status_code == 403, refused.text
        assert "two independent people" in refused.json()["detail"]
    assert _state(server, path) == "quarantined"
    approved = call(server, auditor, "POST", approve, json=AGREE)
    assert approved.status_code == 200, approved.text
    assert _state(server, path) == "released"


def test_two_people_one_admin_enrolled_are_not_two_persons(server, trainer):
    root_admin = server.create_key(role="admin")
    second_admin = _minted(server, root_admin, "admin")
    their_auditor = _minted(server, root_admin, "auditor")
    path = _quarantined(server, trainer)
    approve = _override(server, second_admin, path)
    refused = call(server, their_auditor, "POST", approve, json=AGREE)
    assert refused.status_code == 403 and "same admin enrolled both" in refused.json()["detail"]
    # Through a chain, too: the second admin's own auditor approving the first admin's.
    chained = _minted(server, second_admin, "auditor")
    other = _quarantined(server, trainer)
    refused = call(server, chained, "POST", _override(server, root_admin, other), json=AGREE)
    assert refused.status_code == 403, refused.text
    assert _state(server, path) == _state(server, other) == "quarantined"


def test_a_key_for_an_existing_principal_is_added_only_explicitly_and_audited(server):
    owner_key = server.create_key(owner=name("owner"))
    owner = _principal_name(server, owner_key)
    tc = service(server, owner_key).create_lora_training_client(base_model=TINY, rank=4).result()
    admin = server.create_key(role="admin")

    minted = call(server, admin, "POST", "admin/keys", json={"owner": owner})
    assert minted.status_code == 400 and "keys add" in minted.json()["detail"], minted.text
    cli = run_cli(server.database_url, server.data_dir, "keys", "create", "--role",
                  "researcher", "--owner", owner)
    assert cli.returncode == 2 and "already taken" in cli.stderr and not cli.stdout

    short = call(server, admin, "POST", "admin/principal_keys",
                 json={"principal": owner, "reason": "why"})
    assert short.status_code == 400 and "reason" in short.json()["detail"]
    missing = call(server, admin, "POST", "admin/principal_keys",
                   json={"principal": name("nobody"), "reason": "the owner lost their key"})
    assert missing.status_code == 404
    added = call(server, admin, "POST", "admin/principal_keys",
                 json={"principal": owner, "reason": "the owner lost their key"})
    assert added.status_code == 200, added.text
    runs = rest(server, added.json()["key"]).list_training_runs().result().training_runs
    assert [r.training_run_id for r in runs] == [tc.model_id]
    by_cli = run_cli(server.database_url, server.data_dir, "keys", "add", owner, "--reason",
                     "a second laptop for the owner")
    assert by_cli.returncode == 0 and by_cli.stdout.strip().startswith("tml-"), by_cli.stderr

    admin_id = authenticate_id(server, admin)
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "keys.add").order_by(AuditEntry.seq)).all()
    mine = [(r.actor, json.loads(r.payload)) for r in rows if owner in r.payload]
    assert [(actor, p["reason"], p["created_by"]) for actor, p in mine] == [
        (admin_id, "the owner lost their key", admin_id),
        ("cli", "a second laptop for the owner", "cli")]


def test_a_name_that_exists_or_is_pending_cannot_be_taken_again(server):
    admin = server.create_key(role="admin")
    pending = name("pending")
    filed = call(server, None, "POST", "access_requests", json={
        "name": pending, "contact": "p@lab.example", "purpose": "evals", "base_models": []})
    assert filed.status_code == 200, filed.text
    by_api = call(server, admin, "POST", "admin/keys", json={"owner": pending})
    assert by_api.status_code == 400 and "already taken" in by_api.json()["detail"]
    by_cli = run_cli(server.database_url, server.data_dir, "keys", "create", "--role",
                     "admin", "--owner", pending)
    assert by_cli.returncode == 2 and "already taken" in by_cli.stderr and not by_cli.stdout
    twice = call(server, None, "POST", "access_requests", json={
        "name": pending, "contact": "q@lab.example", "purpose": "evals"})
    assert twice.status_code == 400 and "already taken" in twice.json()["detail"]
    existing = _principal_name(server, server.create_key())
    taken = call(server, None, "POST", "access_requests", json={
        "name": existing, "contact": "r@lab.example", "purpose": "evals"})
    assert taken.status_code == 400 and "already taken" in taken.json()["detail"]

    approved = call(server, admin, "POST",
                    f"admin/access_requests/{filed.json()['request_id']}/approve", json={})
    assert approved.status_code == 200, approved.text
    key = call(server, None, "POST", "access_requests/claim",
               json={"claim_token": filed.json()["claim_token"]}).json()["key"]
    listed = {k["owner"]: k for k in call(server, admin, "GET", "admin/keys").json()["keys"]}
    assert listed[pending]["owner_enrolled_via"] == "access_request"
    assert listed[pending]["owner_enrolled_by"] == authenticate_id(server, admin)
    assert _principal_name(server, key) == pending


def test_the_audit_trail_says_who_enrolled_each_principal_and_issued_each_key(server):
    admin = server.create_key(role="admin")
    admin_id = authenticate_id(server, admin)
    made = call(server, admin, "POST", "admin/keys", json={"owner": name("made")}).json()
    claimed = _claimed(server, admin, "researcher")
    with transaction(server.state.read_factory) as session:
        created_id = authenticate(session, made["key"])[0].id
        claimed_id = authenticate(session, claimed)[0].id
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type.in_(["principals.enroll", "keys.create"]),
            AuditEntry.subject.in_([created_id, claimed_id])).order_by(AuditEntry.seq)).all()
    seen = [(r.event_type, r.subject, r.actor, json.loads(r.payload).get("via")) for r in rows]
    assert seen == [("principals.enroll", created_id, admin_id, "admin"),
                    ("keys.create", created_id, admin_id, "admin"),
                    ("principals.enroll", claimed_id, admin_id, "access_request"),
                    ("keys.create", claimed_id, admin_id, "access_request")]
    assert made["created_by"] == made["owner_enrolled_by"] == admin_id
