"""Approvals bind to content, on SQLite and PostgreSQL.

An override is bound to the checkpoint's adapter SHA-256 and tinker path when it is
requested, not to a row id: it releases only those bytes at that path (evals.overrides).
Deleting a checkpoint cancels its pending overrides (audited), so a checkpoint deleted and
re-created under the same name never inherits one; checkpoint, report and policy-rule ids
are never reused (SQLite AUTOINCREMENT, PostgreSQL sequences); and a checkpoint with a
release decision cannot be overwritten in place.

Quarantines are set directly: the gate's own tests train adapters it quarantines.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text, update

from audit.db import transaction
from audit.models import AuditEntry, Checkpoint, utcnow
from tests.api.helpers import TINY, rest, service
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import AGREE, REASON, gate_server


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with gate_server(request, models_dir, tmp_path_factory, "content") as live:
        yield live


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, str]:
    return {"researcher": server.create_key(scopes={"checkpoints_stored": 200}),
            "admin": server.create_key(role="admin"),
            "auditor": server.create_key(role="auditor")}


@pytest.fixture(scope="module")
def trainer(server: LiveServer, people: dict[str, str]):
    return service(server, people["researcher"]).create_lora_training_client(
        base_model=TINY, rank=4).result()


def call(server: LiveServer, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}/api/v1/{path}",
                         headers={"X-API-Key": key}, timeout=30, **kwargs)


def _row(server: LiveServer, path: str) -> Checkpoint | None:
    with transaction(server.state.read_factory) as session:
        row = session.scalars(select(Checkpoint).where(Checkpoint.tinker_path == path)).first()
        if row is not None:
            session.expunge(row)
        return row


def _quarantine(server: LiveServer, path: str) -> None:
    with transaction(server.state.factory) as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                        .values(release_state="quarantined"))


def _adapter_file(server: LiveServer, path: str) -> Path:
    row = _row(server, path)
    assert row is not None
    return server.state.settings.checkpoint_root / row.storage_dir / "adapter.safetensors"


def _request_override(server: LiveServer, admin: str, path: str) -> dict:
    made = call(server, admin, "POST", "admin/release_overrides",
                json={"tinker_path": path, "reason": REASON})
    assert made.status_code == 201, made.text
    return dict(made.json())


def test_an_override_is_bound_to_the_adapters_sha256_and_releases_only_those_bytes(
        server, people, trainer):
    path = trainer.save_state(f"bound-{uuid.uuid4().hex[:6]}").result().path
    _quarantine(server, path)
    adapter = _adapter_file(server, path)
    override = _request_override(server, people["admin"], path)
    assert override["adapter_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    with transaction(server.state.read_factory) as session:
        audited = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "release.override_requested",
            AuditEntry.subject == path)).one()
    assert json.loads(audited.payload)["adapter_sha256"] == override["adapter_sha256"]

    original = adapter.read_bytes()
    adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # the bytes change
    approve = f"admin/release_overrides/{override['override_id']}/approve"
    refused = call(server, people["auditor"], "POST", approve, json=AGREE)
    assert refused.status_code == 403 and "content" in refused.json()["detail"], refused.text
    assert _row(server, path).release_state == "quarantined"
    adapter.write_bytes(original)
    approved = call(server, people["auditor"], "POST", approve, json=AGREE)
    assert approved.status_code == 200, approved.text
    assert _row(server, path).release_state == "released"


def test_deleting_a_checkpoint_cancels_its_overrides_and_a_namesake_inherits_none(
        server, people, trainer):
    name = f"namesake-{uuid.uuid4().hex[:6]}"
    path = trainer.save_state(name).result().path
    _quarantine(server, path)
    first_id = _row(server, path).id
    override = _request_override(server, people["admin"], path)
    rest(server, people["researcher"]).delete_checkpoint_from_tinker_path(path).result()

    cancelled = call(server, people["admin"], "GET",
                     "admin/release_overrides?status=cancelled").json()["overrides"]
    assert override["override_id"] in [o["override_id"] for o in cancelled]
    with transaction(server.state.read_factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "release.override_cancelled",
            AuditEntry.subject == path)).all()
    assert [json.loads(r.payload)["override_id"] for r in rows] == [override["override_id"]]

    # The same name again, quarantined again (by its own evaluation, say).
    assert trainer.save_state(name).result().path == path
    _quarantine(server, path)
    assert _row(server, path).id > first_id
    approve = f"admin/release_overrides/{override['override_id']}/approve"
    refused = call(server, people["auditor"], "POST", approve, json=AGREE)
    assert refused.status_code == 403 and "cancelled" in refused.json()["detail"]
    assert _row(server, path).release_state == "quarantined"


def test_ids_are_never_reused(server, people, trainer):
    rc = rest(server, people["researcher"])
    first = trainer.save_state(f"gone-{uuid.uuid4().hex[:6]}").result().path
    gone = _row(server, first).id
    rc.delete_checkpoint_from_tinker_path(first).result()
    second = trainer.save_state(f"next-{uuid.uuid4().hex[:6]}").result().path
    assert _row(server, second).id > gone

    rule = {"subject": "principal:nobody", "resource": "records", "action": "read",
            "effect": "deny"}
    added = call(server, people["admin"], "POST", "admin/policy/rules", json=rule).json()
    assert call(server, people["admin"], "DELETE",
                f"admin/policy/rules/{added['id']}").status_code == 204
    again = call(server, people["admin"], "POST", "admin/policy/rules", json=rule).json()
    call(server, people["admin"], "DELETE", f"admin/policy/rules/{again['id']}")
    assert again["id"] > added["id"]

    if server.state.engine.dialect.name == "sqlite":
        with transaction(server.state.read_factory) as session:
            for table in ("checkpoints", "release_reports", "policy_rules"):
                ddl = session.execute(text("SELECT sql FROM sqlite_master WHERE name = :t"),
                                      {"t": table}).scalar_one()
                assert "AUTOINCREMENT" in ddl, table


def test_a_checkpoint_with_a_release_decision_is_not_overwritten_in_place(
        server, people, trainer):
    name = f"decided-{uuid.uuid4().hex[:6]}"
    path = trainer.save_state(name).result().path
    _quarantine(server, path)
    overwrite = call(server, people["researcher"], "POST", "save_weights", json={
        "model_id": trainer.model_id, "path": name, "seq_id": 10_000, "overwrite": True})
    assert overwrite.status_code == 400 and "cannot be overwritten" in overwrite.json()["detail"]
    assert _row(server, path).release_state == "quarantined"


def test_a_checkpoint_swept_at_its_ttl_cancels_its_overrides_too(server, people, trainer):
    from engine.sweeper import sweep_expired_checkpoints
    from gateway.composition import cancel_overrides_of_expired

    path = trainer.save_state(f"expiring-{uuid.uuid4().hex[:6]}").result().path
    _quarantine(server, path)
    override = _request_override(server, people["admin"], path)
    with transaction(server.state.factory) as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                        .values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    swept = sweep_expired_checkpoints(server.state.factory, server.state.settings.checkpoint_root,
                                      actor="test", before_delete=cancel_overrides_of_expired)
    assert path in swept and _row(server, path) is None
    cancelled = call(server, people["admin"], "GET",
                     "admin/release_overrides?status=cancelled").json()["overrides"]
    assert override["override_id"] in [o["override_id"] for o in cancelled]
