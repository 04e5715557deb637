"""TTLs and names, on SQLite and PostgreSQL: a checkpoint past its TTL is not listed,
loaded or sampled; the worker's sweeper and `loragate checkpoints sweep` delete its row
and files and audit it; names and policy words are validated by a full match (a trailing
newline is refused)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import select
from tinker import types

from audit.db import transaction
from audit.models import AuditEntry, Checkpoint
from tests.api.helpers import TINY, rest, run_cli, service
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import module_server

TTL = 2


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The worker's sweeps start switched off, so expired checkpoints stay until a test
    # sweeps them.
    with module_server(request.param, models_dir, tmp_path_factory.mktemp("ttl"),
                       checkpoint_sweep_seconds=0) as live:
        yield live


@pytest.fixture(scope="module")
def owner(server) -> Iterator[tuple[str, tinker.ServiceClient, tinker.TrainingClient]]:
    key = server.create_key()
    client = service(server, key)
    trainer = client.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    yield key, client, trainer
    client.close("success").result()


def _row(server: LiveServer, path: str) -> Checkpoint | None:
    with transaction(server.state.read_factory) as session:
        return session.scalars(select(Checkpoint).where(Checkpoint.tinker_path == path)).first()


def _expired(server: LiveServer, trainer, name: str) -> tuple[str, Path]:
    """A checkpoint saved with a short TTL, once it has expired: (path, its directory)."""
    path = trainer.save_state(name, ttl_seconds=TTL).result().path
    row = _row(server, path)
    assert row is not None and row.expires_at is not None
    time.sleep(TTL + 0.5)
    return path, server.state.settings.checkpoint_root / row.storage_dir


def test_expired_checkpoints_are_not_listed_loaded_or_sampled(server, owner):
    key, client, trainer = owner
    keep = trainer.save_state("keep").result().path
    snapshot = trainer.save_weights_for_sampler("old-sampler", ttl_seconds=TTL).result().path
    sampler = client.create_sampling_client(model_path=snapshot).result()
    old, _ = _expired(server, trainer, "old")
    listed = rest(server, key).list_checkpoints(trainer.model_id).result().checkpoints
    assert [c.tinker_path for c in listed] == [keep]
    mine = rest(server, key).list_user_checkpoints().result().checkpoints
    assert old not in {c.tinker_path for c in mine} and snapshot not in {
        c.tinker_path for c in mine}
    run = rest(server, key).get_training_run(trainer.model_id).result()
    assert run.last_checkpoint.tinker_path == keep and run.last_sampler_checkpoint is None
    with pytest.raises(tinker.NotFoundError, match="expired"):
        client.create_training_client_from_state(old).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):
        client.create_sampling_client(model_path=snapshot).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):
        sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1,
                       types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.NotFoundError, match="expired"):
        rest(server, key).get_weights_info_by_tinker_path(old).result()


def _expired_audit(server: LiveServer, path: str) -> list[AuditEntry]:
    with transaction(server.state.read_factory) as session:
        return list(session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "checkpoint.expired", AuditEntry.subject == path)))


def test_the_worker_sweeps_expired_checkpoints_and_audits_it(server, owner):
    path, directory = _expired(server, owner[2], "swept-by-worker")
    assert directory.is_dir() and _row(server, path) is not None
    server.state.worker.sweep_seconds = 0.2
    try:
        deadline = time.monotonic() + 30
        # The files go right after the row's transaction commits.
        while (_row(server, path) is not None or directory.exists()) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.state.worker.sweep_seconds = 0
    assert _row(server, path) is None and not directory.exists()
    [entry] = _expired_audit(server, path)
    assert entry.actor == "worker:embedded" and entry.decision == "delete"


def test_loragate_checkpoints_sweep_deletes_and_audits(server, owner):
    path, directory = _expired(server, owner[2], "swept-by-cli")
    out = run_cli(server.database_url, server.data_dir, "checkpoints", "sweep")
    assert out.returncode == 0, out.stderr
    assert path in out.stdout.splitlines()
    assert _row(server, path) is None and not directory.exists()
    [entry] = _expired_audit(server, path)
    assert entry.actor == "cli"


@pytest.mark.parametrize("name", ["ckpt\n", "ok.1\n"])
def test_checkpoint_names_are_matched_in_full(server, owner, name):
    trainer = owner[2]
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        trainer.save_state(name).result()
    with pytest.raises(tinker.BadRequestError, match="invalid checkpoint name"):
        trainer.save_weights_for_sampler(name).result()


@pytest.mark.parametrize("field, value", [("subject", "role:researcher\n"),
                                          ("resource", "runs\n"), ("action", "read\n")])
def test_policy_rule_words_are_matched_in_full(server, field, value):
    admin = server.create_key(role="admin")
    rule = {"subject": "role:researcher", "resource": "runs", "action": "read",
            "effect": "deny", field: value}
    resp = httpx.post(f"{server.base_url}/api/v1/admin/policy/rules", json=rule,
                      headers={"X-API-Key": admin}, timeout=30)
    assert resp.status_code == 400, resp.text
    rules = httpx.get(f"{server.base_url}/api/v1/admin/policy", headers={"X-API-Key": admin},
                      timeout=30).json()["rules"]
    assert not any(value in r["values"] for r in rules)
