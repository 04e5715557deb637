"""Who may override a quarantine, what a standing hold stops and what a link needs, on
SQLite and PostgreSQL, through HTTP on 127.0.0.1.

The release review's cases: the owner of a quarantined adapter approved its override after
one admin granted them the approver's permission; an admin who owned the adapter requested
its override; a requester's half counted after their key was revoked; a released checkpoint
of a run that a later quarantine holds was still published and downloaded; a download link
kept working, presented with another key of its principal, after the key that asked for it
was revoked. The invariants (evals.overrides, policy.persons, policy.keys, evals.release,
gateway.context): neither half of an override comes from the weights' owner or anyone
linked to them; a request counts only while its key is usable and its principal may still
request (revoking the key cancels it, audited); nothing of a held run leaves; a link is
honoured only while the key that asked for it is usable, whatever key presents it.

Quarantines are set directly: the gate's own tests train adapters it quarantines.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update
from tinker import types

from audit.db import transaction
from audit.models import ApiKey, AuditEntry, Checkpoint, ReleaseOverride
from evals.release import transition
from gateway import downloads
from policy.keys import authenticate
from tests.api.helpers import TEXTS, TINY, service, sft_datum
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import AGREE, REASON, gate_server
from tests.security.test_two_persons import call, name

TRAINING = (("training", "write"), ("training", "read"), ("futures", "read"),
            ("weights", "export"), ("checkpoints", "manage"))


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with gate_server(request, models_dir, tmp_path_factory, "parties") as live:
        yield live


def who(server: LiveServer, key: str) -> tuple[str, str]:
    """(principal id, key id) behind a key."""
    with transaction(server.state.read_factory) as session:
        principal, api_key = authenticate(session, key)
        return principal.id, api_key.id


def allow(server: LiveServer, admin: str, principal_id: str, resource: str, action: str,
          effect: str = "allow") -> None:
    made = call(server, admin, "POST", "admin/policy/rules", json={
        "subject": f"principal:{principal_id}", "resource": resource, "action": action,
        "effect": effect})
    assert made.status_code == 200, made.text


def trained(server: LiveServer, key: str):
    tc = service(server, key).create_lora_training_client(base_model=TINY, rank=4).result()
    tc.forward_backward([sft_datum(tc.get_tokenizer(), t) for t in TEXTS], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    return tc


def quarantined(server: LiveServer, key: str) -> str:
    path: str = trained(server, key).save_state(name("q")).result().path
    set_state(server, path, "quarantined")
    return path


def set_state(server: LiveServer, path: str, state: str) -> None:
    with transaction(server.state.factory) as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                        .values(release_state=state))


def state_of(server: LiveServer, path: str) -> str:
    with transaction(server.state.read_factory) as session:
        return session.scalars(select(Checkpoint.release_state).where(
            Checkpoint.tinker_path == path)).one()


def request_override(server: LiveServer, admin: str, path: str) -> httpx.Response:
    return call(server, admin, "POST", "admin/release_overrides",
                json={"tinker_path": path, "reason": REASON})


def approve(server: LiveServer, key: str, override_id: str) -> httpx.Response:
    return call(server, key, "POST", f"admin/release_overrides/{override_id}/approve",
                json=AGREE)


def refused_and_audited(server: LiveServer, response: httpx.Response, needle: str) -> None:
    """A 403 naming `needle`, with its own denial row in the audit trail."""
    assert response.status_code == 403, response.text
    assert needle in response.json()["detail"], response.text
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.request_id == response.json()["request_id"])).all()
    assert [r.decision for r in rows] == ["deny"]
    assert needle in json.loads(rows[0].payload)["reason"]


def route(path: str, suffix: str = "") -> str:
    run, kind, ckpt = path.removeprefix("tinker://").split("/")
    return f"training_runs/{run}/checkpoints/{kind}/{ckpt}{suffix}"


def urls(server: LiveServer, key: str, path: str) -> httpx.Response:
    return call(server, key, "GET", route(path, "/external_weights_urls"))


def exported(server: LiveServer, key: str, tc=None) -> tuple[object, str]:
    tc = tc or trained(server, key)
    path = tc.save_weights_external(name("export")).result().path
    set_state(server, path, "released")
    return tc, path


# -- hole: the weights' owner, or someone linked to them, decides an override ----------

def test_the_owner_cannot_approve_the_override_of_their_own_weights(server):
    owner = server.create_key(owner=name("owner"))
    admin = server.create_key(role="admin")
    auditor = server.create_key(role="auditor")
    path = quarantined(server, owner)
    # One admin gives the owner the approver's half: still not a second person.
    allow(server, admin, who(server, owner)[0], "releases", "override_approve")
    made = request_override(server, admin, path)
    assert made.status_code == 201, made.text
    override_id = made.json()["override_id"]
    refused_and_audited(server, approve(server, owner, override_id), "who owns")
    assert state_of(server, path) == "quarantined"
    approved = approve(server, auditor, override_id)
    assert approved.status_code == 200, approved.text
    assert state_of(server, path) == "released"


def test_an_admin_cannot_request_the_override_of_their_own_weights(server):
    admin = server.create_key(role="admin")
    for resource, action in TRAINING:
        allow(server, admin, who(server, admin)[0], resource, action)
    path = quarantined(server, admin)
    refused_and_audited(server, request_override(server, admin, path), "who owns")
    with transaction(server.state.read_factory) as session:
        assert not session.scalars(select(ReleaseOverride).where(
            ReleaseOverride.tinker_path == path)).all()
    assert state_of(server, path) == "quarantined"


def test_the_admin_who_enrolled_the_owner_is_not_independent_of_them(server):
    enroller = server.create_key(role="admin")
    minted = call(server, enroller, "POST", "admin/keys",
                  json={"owner": name("theirs"), "role": "researcher"})
    assert minted.status_code == 200, minted.text
    path = quarantined(server, minted.json()["key"])
    refused_and_audited(server, request_override(server, enroller, path), "linked to them")
    # An auditor the same admin enrolled cannot approve another admin's request either.
    their_auditor = call(server, enroller, "POST", "admin/keys",
                         json={"owner": name("aud"), "role": "auditor"}).json()["key"]
    made = request_override(server, server.create_key(role="admin"), path)
    assert made.status_code == 201, made.text
    refused_and_audited(server, approve(server, their_auditor, made.json()["override_id"]),
                        "linked to them")
    approved = approve(server, server.create_key(role="auditor"), made.json()["override_id"])
    assert approved.status_code == 200, approved.text


# -- hole: a requester's half outlives their key or permission ---------------------------

def test_revoking_the_requesting_key_cancels_its_pending_override(server):
    owner = server.create_key()
    requester, other_admin = server.create_key(role="admin"), server.create_key(role="admin")
    auditor = server.create_key(role="auditor")
    path = quarantined(server, owner)
    made = request_override(server, requester, path)
    assert made.status_code == 201, made.text
    override_id, requester_key = made.json()["override_id"], who(server, requester)[1]
    revoked = call(server, other_admin, "POST", f"admin/keys/{requester_key}/revoke",
                   json={"reason": "the laptop was stolen"})
    assert revoked.status_code == 200, revoked.text
    cancelled = call(server, auditor, "GET", "admin/release_overrides",
                     params={"status": "cancelled"}).json()["overrides"]
    mine = [o for o in cancelled if o["override_id"] == override_id]
    assert mine and "was revoked" in mine[0]["cancel_reason"]
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "release.override_cancelled",
            AuditEntry.subject == path)).all()
    assert [json.loads(r.payload)["api_key_id"] for r in rows] == [requester_key]
    assert rows[0].actor == who(server, other_admin)[0]
    refused_and_audited(server, approve(server, auditor, override_id), "not pending")
    assert state_of(server, path) == "quarantined"


def test_an_override_counts_only_while_its_key_and_permission_stand(server):
    owner = server.create_key()
    requester, admin = server.create_key(role="admin"), server.create_key(role="admin")
    auditor = server.create_key(role="auditor")
    expiring = request_override(server, requester, quarantined(server, owner))
    assert expiring.status_code == 201, expiring.text
    with transaction(server.state.factory) as session:  # the requesting key expired
        session.execute(update(ApiKey).where(ApiKey.id == who(server, requester)[1]).values(
            expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    refused_and_audited(server, approve(server, auditor, expiring.json()["override_id"]),
                        "can no longer be used")

    second = server.create_key(role="admin")
    path = quarantined(server, owner)
    made = request_override(server, second, path)
    assert made.status_code == 201, made.text
    allow(server, admin, who(server, second)[0], "releases", "override_request", "deny")
    refused_and_audited(server, approve(server, auditor, made.json()["override_id"]),
                        "no longer holds the permission")
    assert state_of(server, path) == "quarantined"


# -- hole: a released checkpoint of a held run still leaves --------------------------------

def test_nothing_of_a_held_run_leaves_until_the_override(server):
    owner = server.create_key()
    tc, early = exported(server, owner)
    before = urls(server, owner, early)
    assert before.status_code == 200, before.text
    later = tc.save_state(name("later")).result().path
    with transaction(server.state.factory) as session:  # the gate quarantines a later one
        ckpt = session.scalars(select(Checkpoint).where(Checkpoint.tinker_path == later)).one()
        ckpt.release_state = "evaluating"
        transition(session, ckpt, "quarantined", actor="worker:test",
                   reason="release evaluation", release_id="rel-test")
    for response in (call(server, owner, "POST", route(early, "/publish")),
                     urls(server, owner, early),
                     httpx.get(before.json()["urls"]["adapter_config.json"], timeout=60)):
        assert response.status_code == 403, response.text
        assert later in response.json()["detail"], response.text
    made = request_override(server, server.create_key(role="admin"), later)
    assert made.status_code == 201, made.text
    approved = approve(server, server.create_key(role="auditor"), made.json()["override_id"])
    assert approved.status_code == 200, approved.text
    assert httpx.get(before.json()["urls"]["adapter_config.json"], timeout=60).status_code == 200
    assert call(server, owner, "POST", route(early, "/publish")).status_code == 204


# -- hole: a link outlives its key when another key of the principal presents it -----------

def test_a_link_stops_with_the_key_that_asked_for_it_whatever_key_presents_it(server):
    owner_name = name("linked")
    first = server.create_key(owner=owner_name)
    admin = server.create_key(role="admin")
    _, path = exported(server, first)
    link = urls(server, first, path).json()["urls"]["adapter_config.json"]
    first_key = who(server, first)[1]
    added = call(server, admin, "POST", "admin/principal_keys",
                 json={"principal": owner_name, "reason": "a second laptop for the owner"})
    assert added.status_code == 200, added.text
    second = added.json()["key"]
    assert httpx.get(link, headers={"X-API-Key": second}, timeout=60).status_code == 200
    revoked = call(server, admin, "POST", f"admin/keys/{first_key}/revoke",
                   json={"reason": "the first laptop was lost"})
    assert revoked.status_code == 200, revoked.text
    for headers in ({"X-API-Key": second}, {}):
        stopped = httpx.get(link, headers=headers, timeout=60)
        assert stopped.status_code == 403, stopped.text
        assert "can no longer be used" in stopped.json()["detail"]
    fresh = urls(server, second, path).json()["urls"]["adapter_config.json"]
    assert httpx.get(fresh, timeout=60).status_code == 200
    # A link that names no key is honoured with no key either.
    with transaction(server.state.read_factory) as session:
        ckpt_id = session.scalars(select(Checkpoint.id).where(
            Checkpoint.tinker_path == path)).one()
    token = downloads.sign(server.state.url_signing_secret, downloads.Link(
        ckpt_id, who(server, second)[0], "adapter_config.json", int(time.time()) + 600))
    keyless = httpx.get(f"{server.base_url}/api/v1/external_weights/{token}",
                        headers={"X-API-Key": second}, timeout=60)
    assert keyless.status_code == 403 and "names no API key" in keyless.json()["detail"]
