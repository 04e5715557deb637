"""Policy changes through the admin API take effect on the next request without a
restart — in this process and in any other API process — and are audited with the
policy before and after."""

from __future__ import annotations

import json

import pytest
import tinker
from sqlalchemy import select

from audit.db import transaction
from audit.models import AuditEntry
from policy import authz
from policy.keys import authenticate
from tests.api.helpers import TINY, admin_request, cli_runner, service


def _principal_id(server, key: str) -> str:
    with transaction(server.state.read_factory) as session:
        return authenticate(session, key)[0].id



def test_a_deny_rule_added_by_an_admin_applies_to_the_next_request(server):
    admin = server.create_key(role="admin")
    researcher = server.create_key()
    target = _principal_id(server, researcher)
    sc = service(server, researcher)
    sc.create_lora_training_client(base_model=TINY, rank=4).result()  # allowed before

    added = admin_request(server, admin, "POST", "policy/rules", json={
        "subject": f"principal:{target}", "resource": "training", "action": "write",
        "effect": "deny"})
    assert added.status_code == 200, added.text
    with pytest.raises(tinker.PermissionDeniedError, match="not allow"):
        sc.create_lora_training_client(base_model=TINY, rank=4).result()

    with transaction(server.state.read_factory) as session:
        row = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "policy.add_rule").order_by(AuditEntry.seq.desc())).first()
    payload = json.loads(row.payload)
    assert payload["rule"] == f"p, principal:{target}, training, write, deny"
    assert payload["after"]["rules"] == payload["before"]["rules"] + 1
    assert payload["after"]["sha256"] != payload["before"]["sha256"]

    removed = admin_request(server, admin, "DELETE", f"policy/rules/{added.json()['id']}")
    assert removed.status_code == 204
    sc.create_lora_training_client(base_model=TINY, rank=4).result()  # allowed again
    sc.close("success").result()
    # Each decision records the policy version it was made under.
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "api.create_model", AuditEntry.actor == target)
            .order_by(AuditEntry.seq)).all()
    versions = [json.loads(r.payload)["policy_version"] for r in rows]
    assert [r.decision for r in rows] == ["allow", "deny", "allow"]
    assert versions[0] != versions[1] != versions[2]


@pytest.mark.parametrize("role, can_read", [("researcher", False), ("auditor", True)])
def test_only_admins_edit_the_policy(server, role, can_read):
    key = server.create_key(role=role)
    assert admin_request(server, key, "GET", "policy").status_code == (200 if can_read else 403)
    resp = admin_request(server, key, "POST", "policy/rules", json={
        "subject": "*", "resource": "training", "action": "write", "effect": "allow"})
    assert resp.status_code == 403


@pytest.mark.parametrize("rule, status, message", [
    ({"subject": "everyone", "resource": "training", "action": "write", "effect": "allow"},
     400, "subject"),
    ({"subject": "*", "resource": "Training!", "action": "write", "effect": "allow"},
     400, "lower-case"),
    ({"subject": "*", "resource": "training", "action": "write", "effect": "maybe"},
     400, "effect"),
    ({"subject": "*", "resource": "training"}, 422, "action: Field required"),
    ({"subject": "*", "resource": "training", "action": "", "effect": "allow"}, 422,
     "action: String should have at least 1 character"),
])
def test_malformed_rules_are_refused_and_change_nothing(server, rule, status, message):
    admin = server.create_key(role="admin")
    before = admin_request(server, admin, "GET", "policy").json()["rules"]
    resp = admin_request(server, admin, "POST", "policy/rules", json=rule)
    assert resp.status_code == status and message in resp.json()["detail"], resp.text
    assert admin_request(server, admin, "GET", "policy").json()["rules"] == before


def test_removing_an_unknown_rule_is_a_404(server):
    admin = server.create_key(role="admin")
    assert admin_request(server, admin, "DELETE", "policy/rules/999999").status_code == 404


def test_another_api_process_sees_the_change_on_its_next_check(database_url):
    from audit.db import make_engine, make_sessionmaker
    from migrations import upgrade_to_head

    upgrade_to_head(database_url)
    engine, reader = make_engine(database_url), make_engine(database_url, read_only=True)
    factory, read_factory = make_sessionmaker(engine), make_sessionmaker(reader)
    with transaction(factory) as session:
        authz.seed_default_policy(session)
    this_process, other_process = authz.Authorizer(read_factory), authz.Authorizer(read_factory)
    this_process.load()
    other_process.load()
    assert other_process.allows("p", "researcher", "sampling", "use")
    with transaction(factory) as session:
        authz.add_rule(session, actor="admin", subject="role:researcher", resource="sampling",
                       action="use", effect="deny")
    with transaction(read_factory) as session:
        other_process.ensure_current(session)
    assert not other_process.allows("p", "researcher", "sampling", "use")
    engine.dispose()
    reader.dispose()


def test_the_cli_lists_adds_and_removes_rules_with_audit(database_url, tmp_path):

    from audit.db import make_engine, make_sessionmaker

    cli = cli_runner(database_url, tmp_path, "policy")

    listed = cli("list")
    assert listed.returncode == 0 and "role:researcher, training, write, allow" in listed.stdout
    added = cli("add", "role:auditor", "sampling", "use", "deny")
    assert added.returncode == 0, added.stderr
    rule_id = added.stdout.split("\t")[0]
    assert cli("remove", rule_id).returncode == 0
    bad = cli("add", "nobody", "sampling", "use", "deny")
    assert bad.returncode == 2 and "subject" in bad.stderr
    engine = make_engine(database_url)
    with transaction(make_sessionmaker(engine)) as session:
        events = [e.event_type for e in session.scalars(
            select(AuditEntry).where(AuditEntry.actor == "cli").order_by(AuditEntry.seq)).all()]
    engine.dispose()
    assert events == ["policy.seed", "policy.add_rule", "policy.remove_rule"]
