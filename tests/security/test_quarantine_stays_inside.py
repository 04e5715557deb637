"""Quarantine means the capability stays inside, on SQLite and PostgreSQL.

A quarantined or evaluating adapter never reaches another principal: not through a
sampler on its path, not loaded into their training run
(`create_training_client_from_state`), not published, listed, described or exported, and
not because its `public` flag is set. Its owner cannot publish it either, and samples a
quarantined adapter only when the release policy says so (`[gate]
owner_may_sample_quarantined`, default false) — then within the key's caps like any
sampler; a fresh snapshot of the quarantined run's weights is held the same way. While its
release evaluation runs, its owner samples it only where `[gate]
owner_may_sample_evaluating` allows (default false).

The release states are set directly: the gate's own tests train adapters it quarantines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tinker
from sqlalchemy import select, update
from tinker import types

from audit.db import transaction
from audit.models import Checkpoint
from evals.release import transition
from policy.release import DEFAULT_RELEASE_PATH, ReleasePolicyError, load_release_policy
from tests.api.helpers import TINY, rest, service
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import module_server

PROMPT = types.ModelInput.from_ints([5, 6, 7, 8])
GREEDY = types.SamplingParams(max_tokens=2, temperature=0.0, stop=[])


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with module_server(request.param, models_dir,
                       tmp_path_factory.mktemp("quarantine")) as live:
        yield live


@dataclasses.dataclass
class Owned:
    key: str
    sc: tinker.ServiceClient
    trainer: tinker.TrainingClient
    path: str  # sampler weights the owner saved
    sampler: tinker.SamplingClient  # made on that path before the gate decided


def _owned(server: LiveServer, state: str, **scopes: int) -> Owned:
    key = server.create_key(scopes=scopes or None)
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    path = trainer.save_weights_for_sampler("held").result().path
    sampler = sc.create_sampling_client(model_path=path).result()
    assert sampler.sample(PROMPT, 1, GREEDY).result().sequences  # private: the owner samples
    _set_state(server, path, state)
    return Owned(key, sc, trainer, path, sampler)


def _set_state(server: LiveServer, path: str, state: str, **values: object) -> None:
    with transaction(server.state.factory) as session:
        session.execute(update(Checkpoint).where(Checkpoint.tinker_path == path)
                        .values(release_state=state, **values))


def _route(path: str, suffix: str = "") -> str:
    run, kind, name = path.removeprefix("tinker://").split("/")
    return f"/api/v1/training_runs/{run}/checkpoints/{kind}/{name}{suffix}"


def _call(server: LiveServer, key: str, method: str, route: str, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{route}", headers={"X-API-Key": key},
                         timeout=30, **kwargs)


def test_a_quarantined_adapter_is_not_sampled_by_its_owner_by_default(server):
    owner = _owned(server, "quarantined")
    refusal = "is quarantined.*owner_may_sample_quarantined"
    with pytest.raises(tinker.PermissionDeniedError, match=refusal):
        owner.sampler.sample(PROMPT, 1, GREEDY).result()
    with pytest.raises(tinker.PermissionDeniedError, match=refusal):
        owner.sampler.compute_logprobs(PROMPT).result()
    with pytest.raises(tinker.PermissionDeniedError, match=refusal):
        owner.sc.create_sampling_client(model_path=owner.path).result()
    owner.sc.close("success").result()


def test_a_fresh_snapshot_of_quarantined_weights_is_not_a_way_around(server):
    owner = _owned(server, "evaluating")
    with transaction(server.state.factory) as session:  # the gate's decision, as it records it
        ckpt = session.scalars(select(Checkpoint).filter_by(tinker_path=owner.path)).one()
        transition(session, ckpt, "quarantined", actor="test", reason="test quarantine")
    snapshot = owner.trainer.save_weights_and_get_sampling_client().result()
    held = f"is held by the quarantine of {owner.path}"
    with pytest.raises(tinker.PermissionDeniedError, match=held):
        snapshot.sample(PROMPT, 1, GREEDY).result()
    child = owner.sc.create_training_client_from_state(owner.path).result()  # a descendant
    with pytest.raises(tinker.PermissionDeniedError, match=held):
        child.save_weights_and_get_sampling_client().result().sample(PROMPT, 1, GREEDY).result()
    owner.sc.close("success").result()


def test_an_evaluating_adapter_is_not_sampled_by_its_owner_by_default(server, monkeypatch):
    owner = _owned(server, "evaluating")
    refusal = "being evaluated.*owner_may_sample_evaluating"
    with pytest.raises(tinker.PermissionDeniedError, match=refusal):
        owner.sampler.sample(PROMPT, 1, GREEDY).result()
    with pytest.raises(tinker.PermissionDeniedError, match=refusal):
        owner.sc.create_sampling_client(model_path=owner.path).result()
    policy = dataclasses.replace(server.state.release_policy, owner_may_sample_evaluating=True)
    monkeypatch.setattr(server.state, "release_policy", policy)
    assert owner.sampler.sample(PROMPT, 1, GREEDY).result().sequences
    again = owner.sc.create_sampling_client(model_path=owner.path).result()
    assert again.sample(PROMPT, 1, GREEDY).result().sequences
    owner.sc.close("success").result()


@pytest.mark.parametrize("state", ["quarantined", "evaluating"])
def test_a_held_adapter_never_reaches_another_principal_even_flagged_public(server, state):
    owner = _owned(server, state)
    _set_state(server, owner.path, state, public=True, publish_on_release=True)
    other_key = server.create_key()
    other = service(server, other_key)
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=owner.path).result()
    with pytest.raises(tinker.NotFoundError):
        other.create_training_client_from_state(owner.path).result()
    with pytest.raises(tinker.NotFoundError):
        rest(server, other_key).get_weights_info_by_tinker_path(owner.path).result()
    listed = rest(server, other_key).list_user_checkpoints().result().checkpoints
    assert owner.path not in {c.tinker_path for c in listed}
    sampler_id = owner.sampler._sampling_session_id
    asample = types.SampleRequest(sampling_session_id=sampler_id, seq_id=900, num_samples=1,
                                  prompt=PROMPT, sampling_params=GREEDY)
    for method, route, kwargs in [
        ("POST", "/api/v1/asample", {"json": asample.model_dump(mode="json",
                                                                 exclude_none=True)}),
        ("POST", _route(owner.path, "/publish"), {}),
        ("GET", _route(owner.path, "/external_weights_urls"), {}),
        ("POST", "/api/v1/load_weights", {"json": {
            "path": owner.path, "optimizer": False, "session_id": "sess-x",
            "model_seq_id": 0}}),
    ]:
        resp = _call(server, other_key, method, route, **kwargs)
        assert resp.status_code == 404, (route, resp.status_code, resp.text)
    other.close("success").result()
    owner.sc.close("success").result()


def test_the_owner_cannot_publish_or_export_a_quarantined_adapter(server):
    owner = _owned(server, "quarantined")
    resp = _call(server, owner.key, "POST", _route(owner.path, "/publish"))
    assert resp.status_code == 403 and "quarantined" in resp.json()["detail"], resp.text
    resp = _call(server, owner.key, "POST", "/api/v1/releases", json={"tinker_path": owner.path})
    assert resp.status_code == 403 and "two-person override" in resp.json()["detail"], resp.text
    owner.sc.close("success").result()


def test_the_release_policy_can_let_the_owner_sample_within_the_caps(server, monkeypatch):
    policy = dataclasses.replace(server.state.release_policy,
                                 owner_may_sample_quarantined=True)
    monkeypatch.setattr(server.state, "release_policy", policy)
    owner = _owned(server, "quarantined", max_base_topk_logprobs=2)
    assert owner.sampler.sample(PROMPT, 1, GREEDY).result().sequences
    again = owner.sc.create_sampling_client(model_path=owner.path).result()
    out = again.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True,
                       topk_prompt_logprobs=2).result()
    assert len(out.topk_prompt_logprobs[1]) == 2
    with pytest.raises(tinker.PermissionDeniedError, match="maximum of 2"):
        again.sample(PROMPT, 1, GREEDY, include_prompt_logprobs=True,
                     topk_prompt_logprobs=5).result()
    other = service(server, server.create_key())
    with pytest.raises(tinker.NotFoundError):
        other.create_sampling_client(model_path=owner.path).result()
    other.close("success").result()
    owner.sc.close("success").result()


@pytest.mark.parametrize("key", ["owner_may_sample_quarantined",
                                 "owner_may_sample_evaluating"])
def test_owner_sampling_keys_are_documented_gate_keys_off_by_default(tmp_path, key):
    text = DEFAULT_RELEASE_PATH.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert key in header
    for name, line, expected in (("shipped", None, False), ("absent", "", False),
                                 ("true", f"{key} = true", True),
                                 ("false", f"{key} = false", False)):
        policy = tmp_path / f"release-{name}.toml"
        policy.write_text(_variant(text, key, line))
        assert getattr(load_release_policy(policy), key) is expected, name
    bad = tmp_path / "release-bad.toml"
    bad.write_text(_variant(text, key, f'{key} = "yes"'))
    with pytest.raises(ReleasePolicyError, match=f"{key} must be true or false"):
        load_release_policy(bad)


def _variant(text: str, key: str, line: str | None) -> str:
    """The shipped release policy without its calibration file (which lives beside it),
    with its `key` line kept (None) or replaced by `line`."""
    head, _, body = text.partition("\n[gate]\n")
    dropped = ("calibration", key) if line is not None else ("calibration",)
    kept = [entry for entry in body.split("\n") if not entry.startswith(dropped)]
    return f"{head}\n[gate]\n{line or ''}\n" + "\n".join(kept)
