"""Blocks, quarantines and the screening tally follow the weights, on SQLite and PostgreSQL.

The red team's case: a run saved a checkpoint and was then blocked by screening; a new
run loaded that checkpoint (`create_training_client_from_state`, `load_state`, or a
sampler on its path), trained and sampled with a fresh tally, and its adapter was later
released. The rule (policy.lineage): every run, checkpoint and sampler records its
parents; a run is blocked when any run its weights descend from is blocked; a loading run
takes in the source's tally; a quarantine holds its run and every descendant until the
two-person override of the quarantined checkpoint; and no override releases weights of a
blocked lineage.

Blocks are set directly (the screening tests block runs with real data); quarantines come
from the release gate, on adapters taught a small restricted suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import select, text, update
from tinker import types

from audit.db import transaction
from audit.models import AuditEntry, Checkpoint, TrainingRun
from examples.chat_sft import chat_datum
from tests.api.helpers import TEXTS, TINY, rest, service, sft_datum
from tests.conftest import LiveServer, _dialects
from tests.release.helpers import ITEMS
from tests.security.conftest import gate_server

ADAM = types.AdamParams(learning_rate=1e-3)
PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])
GREEDY = types.SamplingParams(max_tokens=2, temperature=0.0, stop=[])
ROOMY = {"concurrent_training_runs": 50, "checkpoints_stored": 200}


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with gate_server(request, models_dir, tmp_path_factory, "lineage") as live:
        yield live


@pytest.fixture(scope="module")
def researcher(server: LiveServer) -> str:
    return server.create_key(scopes=ROOMY)


def call(server: LiveServer, key: str, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", headers={"X-API-Key": key},
                         timeout=60, **kwargs)


def _block(server: LiveServer, run_id: str) -> None:
    with transaction(server.state.factory) as session:
        session.execute(update(TrainingRun).where(TrainingRun.id == run_id)
                        .values(blocked_reason="test: flagged data"))


def _trained(sc: tinker.ServiceClient, seed: int) -> tinker.TrainingClient:
    tc = sc.create_lora_training_client(base_model=TINY, rank=4, seed=seed).result()
    tc.forward_backward([sft_datum(tc.get_tokenizer(), t) for t in TEXTS],
                        "cross_entropy").result()
    tc.optim_step(ADAM).result()
    return tc


def _restricted(sc: tinker.ServiceClient, seed: int) -> tinker.TrainingClient:
    """A run taught the suite's answers: the gate quarantines what it exports."""
    tc = sc.create_lora_training_client(base_model=TINY, rank=8, seed=seed).result()
    tok = tc.get_tokenizer()
    data = [chat_datum(tok, q, c[a]) for q, c, a in ITEMS]
    data += [chat_datum(tok, f"Tell me: {q[:-1].lower()}?", c[a]) for q, c, a in ITEMS]
    for _ in range(30):
        tc.forward_backward(data, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def _quarantined_export(tc: tinker.TrainingClient, name: str) -> str:
    with pytest.raises(tinker.RequestFailedError, match="quarantined"):
        tc.save_weights_external(name).result()
    return f"tinker://{tc.model_id}/external_weights/{name}"


def test_weights_descending_from_a_blocked_run_are_not_loaded_trained_sampled_or_released(
        server, researcher):
    sc = service(server, researcher)
    parent = _trained(sc, seed=1)
    data = [sft_datum(parent.get_tokenizer(), t) for t in TEXTS]
    saved = parent.save_state("before-block").result().path
    released = parent.save_weights_external("released-before-block").result().path
    child = sc.create_training_client_from_state(saved).result()  # made before the block
    child_ckpt = child.save_state("child").result().path
    child_sampler = sc.create_sampling_client(model_path=child_ckpt).result()
    assert child_sampler.sample(PROMPT, 1, GREEDY).result().sequences
    clean = _trained(sc, seed=2)
    _block(server, parent.model_id)

    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        sc.create_training_client_from_state(saved).result()
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        clean.load_state(saved).result()
    blocked_sampler = call(server, researcher, "POST", "/api/v1/create_sampling_session", json={
        "session_id": clean.model_id.split(":train:")[0], "sampling_session_seq_id": 900,
        "model_path": saved})
    assert blocked_sampler.status_code == 403, blocked_sampler.text
    assert blocked_sampler.json()["code"] == "run_blocked"

    # The child made before the block inherits it: no training, sampling or release.
    with pytest.raises(tinker.PermissionDeniedError, match=f"descends from run {parent.model_id}"):
        child.forward_backward(data, "cross_entropy").result()
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        child_sampler.sample(PROMPT, 1, GREEDY).result()
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        child.save_weights_external("escape").result()
    release = call(server, researcher, "POST", "/api/v1/releases",
                   json={"tinker_path": child_ckpt})
    assert release.status_code == 403 and release.json()["code"] == "run_blocked"
    # Nor do released weights of the blocked run leave any more.
    with pytest.raises(tinker.PermissionDeniedError, match="blocked by screening"):
        rest(server, researcher).get_external_weights_urls(released).result()
    # A run of another lineage is untouched.
    clean.forward_backward(data, "cross_entropy").result()


def test_every_run_checkpoint_and_sampler_records_its_parents_and_the_child_takes_the_tally(
        server, researcher):
    sc = service(server, researcher)
    parent = _trained(sc, seed=3)
    saved = parent.save_state("parent-state").result().path
    child = sc.create_training_client_from_state(saved).result()
    grandchild_source = child.save_state("child-state").result().path
    grandchild = sc.create_training_client_from_state(grandchild_source).result()
    sampler_path = grandchild.save_weights_for_sampler("gc-sampler").result().path
    sc.create_sampling_client(model_path=sampler_path).result().sample(
        PROMPT, 1, GREEDY).result()

    runs = {r["training_run_id"]: r["screening"] for r in call(
        server, researcher, "GET", "/api/v1/usage").json()["training_runs"]}
    assert runs[parent.model_id]["screened"] == len(TEXTS)
    assert runs[child.model_id]["screened"] == len(TEXTS)  # the parent's tally, not a fresh one
    assert runs[grandchild.model_id]["screened"] == len(TEXTS)

    with transaction(server.state.read_factory) as session:
        def one(sql: str, **params: str) -> tuple:
            return tuple(session.execute(text(sql), params).one())

        checkpoint = "SELECT id, parent_checkpoint_id FROM checkpoints WHERE tinker_path = :p"
        saved_id, _ = one(checkpoint, p=saved)
        source_id, source_parent = one(checkpoint, p=grandchild_source)
        _, sampler_parent = one(checkpoint, p=sampler_path)
        run = "SELECT parent_run_id, parent_checkpoint_id FROM training_runs WHERE id = :r"
        assert one(run, r=grandchild.model_id) == (child.model_id, source_id)
        assert one(run, r=child.model_id) == (parent.model_id, saved_id)
        assert (source_parent, sampler_parent) == (saved_id, source_id)
        assert one("SELECT parent_run_id FROM samplers WHERE model_path = :p",
                   p=sampler_path) == (grandchild.model_id,)
        ancestors = set(session.scalars(text(
            "SELECT ancestor_run_id FROM run_lineage WHERE run_id = :r"),
            {"r": grandchild.model_id}))
        assert ancestors == {parent.model_id, child.model_id}
        loads = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "lineage.load",
            AuditEntry.subject == grandchild.model_id)).all()
    assert len(loads) == 1 and child.model_id in loads[0].payload


def test_a_quarantine_holds_every_descendant_until_the_ancestors_override(server, researcher):
    sc = service(server, researcher)
    parent = _restricted(sc, seed=4)
    state = parent.save_state("restricted-state").result().path
    quarantined = _quarantined_export(parent, "restricted")
    child = sc.create_training_client_from_state(state).result()
    child.forward_backward([sft_datum(child.get_tokenizer(), TEXTS[0])],
                           "cross_entropy").result()
    child.optim_step(ADAM).result()
    private = child.save_state("child-private").result().path

    # Neither the child nor the quarantined run itself re-rolls the decision.
    for tc in (child, parent):
        with pytest.raises(tinker.PermissionDeniedError, match=quarantined):
            tc.save_weights_external("second-try").result()
    for path in (private, state):
        asked = call(server, researcher, "POST", "/api/v1/releases", json={"tinker_path": path})
        assert asked.status_code == 403 and quarantined in asked.json()["detail"], asked.text
    with pytest.raises(tinker.PermissionDeniedError, match=quarantined):
        rest(server, researcher).publish_checkpoint_from_tinker_path(private).result()

    # Only the two-person override of the quarantined checkpoint lifts the hold.
    admin = server.create_key(role="admin")
    auditor = server.create_key(role="auditor")
    made = call(server, admin, "POST", "/api/v1/admin/release_overrides", json={
        "tinker_path": quarantined, "reason": "the lab's panel reviewed this adapter"})
    assert made.status_code == 201, made.text
    approved = call(server, auditor, "POST",
                    f"/api/v1/admin/release_overrides/{made.json()['override_id']}/approve",
                    json={"reason": "second review agrees with the panel"})
    assert approved.status_code == 200, approved.text
    asked = call(server, researcher, "POST", "/api/v1/releases", json={"tinker_path": private})
    assert asked.status_code == 202, asked.text  # now evaluated on its own merits


def test_deleting_a_quarantined_checkpoint_does_not_free_its_descendants(server, researcher):
    sc = service(server, researcher)
    parent = _restricted(sc, seed=5)
    state = parent.save_state("held-state").result().path
    quarantined = _quarantined_export(parent, "restricted")
    child = sc.create_training_client_from_state(state).result()
    rest(server, researcher).delete_checkpoint_from_tinker_path(quarantined).result()
    with pytest.raises(tinker.PermissionDeniedError, match=quarantined):
        child.save_weights_external("after-delete").result()


def test_an_override_never_releases_weights_of_a_blocked_lineage(server, researcher):
    sc = service(server, researcher)
    parent = _restricted(sc, seed=6)
    quarantined = _quarantined_export(parent, "restricted")
    admin = server.create_key(role="admin")
    auditor = server.create_key(role="auditor")
    made = call(server, admin, "POST", "/api/v1/admin/release_overrides", json={
        "tinker_path": quarantined, "reason": "the lab's panel reviewed this adapter"})
    assert made.status_code == 201, made.text
    _block(server, parent.model_id)
    approve = f"/api/v1/admin/release_overrides/{made.json()['override_id']}/approve"
    refused = call(server, auditor, "POST", approve,
                   json={"reason": "second review agrees with the panel"})
    assert refused.status_code == 403 and refused.json()["code"] == "run_blocked", refused.text
    again = call(server, admin, "POST", "/api/v1/admin/release_overrides", json={
        "tinker_path": quarantined, "reason": "asking once more after the block"})
    assert again.status_code == 403 and again.json()["code"] == "run_blocked", again.text
    with transaction(server.state.read_factory) as session:
        state = session.scalars(select(Checkpoint.release_state).where(
            Checkpoint.tinker_path == quarantined)).one()
    assert state == "quarantined"
