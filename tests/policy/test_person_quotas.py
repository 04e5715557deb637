"""Quotas belong to the person, not to the API key: a person's keys share every budget
and slot, the tightest key is the limit, and a run cannot escape its slot by finishing its
session or by going silent. Through the official SDK and HTTP, on SQLite and PostgreSQL
(regressions of the security review's two-keys and finished-session reproductions)."""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import pytest
import tinker
from tinker import types

from audit.db import transaction
from audit.models import ApiKey, ClientSession, Future, Principal, utcnow
from engine.queue import enqueue
from gateway.runs import add_training_run
from policy import quotas
from policy.keys import add_key, authenticate, create_key
from policy.scopes import effective, load_defaults
from tests.api.helpers import TEXTS, TINY, rest, service, sft_datum

ADAM = types.AdamParams(learning_rate=1e-3)


def person_with_two_keys(server, scopes_a: dict | None = None,
                         scopes_b: dict | None = None) -> tuple[str, str, str]:
    """A new person's name and two keys of theirs (B added as a second key)."""
    owner = f"two-keys-{uuid.uuid4().hex[:8]}"
    a = server.create_key(owner=owner, scopes=scopes_a)
    with transaction(server.state.factory) as session:
        b, _ = add_key(session, principal_name=owner, actor="test",
                       reason="a second key for the person's laptop",
                       defaults=server.state.scope_defaults, scopes=scopes_b)
    return owner, a, b


def post(server, key: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/api/v1/{route}", json=body,
                      headers={"X-API-Key": key}, timeout=30)


def usage(server, key: str) -> dict:
    resp = httpx.get(f"{server.base_url}/api/v1/usage", headers={"X-API-Key": key}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_second_key_saves_no_checkpoint_past_the_persons_quota(server):
    # Key B has the default quota (100); the person's limit is the tighter key's, 1.
    owner, a, b = person_with_two_keys(server, scopes_a={"checkpoints_stored": 1})
    sa = service(server, a)
    trainer = sa.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    trainer.save_state("a1").result()
    with pytest.raises(tinker.PermissionDeniedError, match="checkpoints_stored"):
        trainer.save_state("a2").result()
    for i in range(3):  # key B drives the same run (the person's) through HTTP
        resp = post(server, b, "save_weights",
                    {"model_id": trainer.model_id, "path": f"b{i}", "seq_id": 1000 + i})
        assert resp.status_code == 403, resp.text
        assert resp.json()["code"] == "quota_exceeded"
        assert "1 of 1 checkpoints are stored" in resp.json()["detail"]
    stored = rest(server, a).list_user_checkpoints().result().checkpoints
    assert [c.checkpoint_id for c in stored] == ["weights/a1"]
    [person] = usage(server, b)["principals"]
    assert person["owner"] == owner and (person["stored_checkpoints"],
                                         person["checkpoints_stored"]) == (1, 1)
    assert person["limits"]["checkpoints_stored"] == 1
    sa.close("success").result()


def test_a_persons_keys_share_one_day_budget(server):
    budget = {"sampled_tokens_per_day": 10}
    _, a, b = person_with_two_keys(server, scopes_a=budget, scopes_b=budget)
    prompt = types.ModelInput.from_ints([5, 6, 7])
    sa, sb = service(server, a), service(server, b)
    sa.create_sampling_client(base_model=TINY).result().sample(
        prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])).result()
    with pytest.raises(tinker.PermissionDeniedError,
                       match=r"sampled_tokens_per_day exceeded: this request needs 8 .* 6 of "
                             r"today's 10 \(shared by all your API keys\)"):
        sb.create_sampling_client(base_model=TINY).result().sample(
            prompt, 2, types.SamplingParams(max_tokens=4, stop=[])).result()
    [person] = usage(server, b)["principals"]
    today = person["today"]
    assert (today["sampled_tokens"], today["sampled_tokens_per_day"]) == (6, 10)
    per_key = {k["key_id"]: k["today"]["sampled_tokens"] for k in usage(server, b)["keys"]}
    assert sorted(per_key.values()) == [0, 6]  # attributed to the key that used them
    sa.close("success").result()
    sb.close("success").result()


def test_a_persons_keys_share_the_run_slots(server):
    slots = {"concurrent_training_runs": 1}
    _, a, b = person_with_two_keys(server, scopes_a=slots, scopes_b=slots)
    sa, sb = service(server, a), service(server, b)
    sa.create_lora_training_client(base_model=TINY, rank=4).result()
    with pytest.raises(tinker.PermissionDeniedError,
                       match="concurrent_training_runs exceeded: 1 of 1 training runs"):
        sb.create_lora_training_client(base_model=TINY, rank=4).result()
    [person] = usage(server, b)["principals"]
    assert (person["live_training_runs"], person["concurrent_training_runs"]) == (1, 1)
    sa.close("success").result()
    sb.create_lora_training_client(base_model=TINY, rank=4).result()
    sb.close("success").result()


def test_a_run_whose_session_is_finished_takes_no_more_work(server):
    key = server.create_key(scopes={"concurrent_training_runs": 1})
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    tok = trainer.get_tokenizer()
    datum = sft_datum(tok, TEXTS[0])
    trainer.forward_backward([datum], "cross_entropy").result()
    session_id = trainer.model_id.split(":")[0]
    assert post(server, key, f"sessions/{session_id}/finish", {}).status_code == 200
    # Its slot is free (a new run starts), and the finished session's run trains no more.
    other = service(server, key)
    other.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    finished = f"session {session_id}, which is finished"
    with pytest.raises(tinker.BadRequestError, match=finished):
        trainer.forward_backward([datum], "cross_entropy").result()
    with pytest.raises(tinker.BadRequestError, match=finished):
        trainer.optim_step(ADAM).result()
    with pytest.raises(tinker.BadRequestError, match=finished):
        trainer.save_state("after-finish").result()
    resp = post(server, key, "save_weights_for_sampler",
                {"model_id": trainer.model_id, "path": "s", "seq_id": 900})
    assert resp.status_code == 400 and "create a new training client" in resp.json()["detail"]
    other.close("success").result()


# ------------------------------------------------------------ the person, in the database


@pytest.fixture
def person(factory):
    """A person with a key allowed one live run, and that key's id and scopes."""
    defaults = load_defaults()
    with transaction(factory) as session:
        plaintext = create_key(session, owner=f"p-{uuid.uuid4().hex[:8]}", role="researcher",
                               actor="test", defaults=defaults,
                               scopes={"concurrent_training_runs": 1})
    with transaction(factory) as session:
        principal, key = authenticate(session, plaintext)
        return principal.id, key.id, effective(defaults, key.scopes)


def _run(session, principal_id: str, key_id: str) -> str:
    sid = f"sess-{uuid.uuid4().hex[:12]}"
    session.add(ClientSession(id=sid, principal_id=principal_id))
    session.flush()
    run = add_training_run(session, run_id=f"{sid}:train:0", session_id=sid, model_seq_id=0,
                           principal_id=principal_id, api_key_id=key_id, base_model=TINY,
                           lora_rank=4, lora_config="{}", user_metadata=None)
    return run.id


def test_a_silent_run_used_again_must_find_a_free_slot(factory, person):
    principal_id, key_id, scopes = person
    with transaction(factory) as session:
        first, second = _run(session, principal_id, key_id), _run(session, principal_id, key_id)
    later = utcnow() + dt.timedelta(seconds=quotas.RUN_IDLE_SECONDS + 60)
    with transaction(factory) as session:
        # Both went silent: the first to come back takes the one slot...
        quotas.reserve(session, key_id, scopes, quotas.Charge(uses_run=first), now=later)
        enqueue(session, kind="optim_step", payload=b"{}", principal_id=principal_id,
                model_id=first, api_key_id=key_id)
    with transaction(factory) as session:
        # ...and holds it while its work is queued, so the second finds none.
        assert quotas.live_runs(session, principal_id, later) == [first]
        with pytest.raises(quotas.QuotaExceeded, match=f"training run {second} was silent"):
            quotas.check(session, key_id, scopes, quotas.Charge(uses_run=second), now=later)
        with pytest.raises(quotas.QuotaExceeded, match="1 of 1 training runs are alive"):
            quotas.check(session, key_id, scopes, quotas.Charge(new_run="x"), now=later)
        # The run that holds the slot goes on.
        quotas.check(session, key_id, scopes, quotas.Charge(uses_run=first), now=later)
    with transaction(factory) as session:
        session.query(Future).filter_by(model_id=first).update({"status": "done"})
    with transaction(factory) as session:
        quotas.check(session, key_id, scopes, quotas.Charge(uses_run=second), now=later)


def test_the_persons_limit_is_the_tightest_usable_key(factory, person):
    principal_id, key_id, scopes = person
    defaults = load_defaults()
    name = None
    with transaction(factory) as session:
        name = session.get(Principal, principal_id).name
        add_key(session, principal_name=name, actor="test", reason="a tighter laptop key",
                defaults=defaults, scopes={"training_tokens_per_day": 7})
    with transaction(factory) as session:
        who = quotas.person_of(session, key_id, scopes)
        assert who.limits.training_tokens_per_day == 7
        assert who.limits.concurrent_training_runs == 1
        assert who.limits.max_lora_rank == scopes.max_lora_rank  # not a quota: the key's own
        with pytest.raises(quotas.QuotaExceeded, match="needs 8 training tokens"):
            quotas.check(session, key_id, scopes, quotas.Charge(training_tokens=8))
        # A revoked key no longer limits the person (its usage still counts).
        session.query(ApiKey).filter(ApiKey.principal_id == principal_id,
                                     ApiKey.id != key_id).update({"status": "revoked"})
    with transaction(factory) as session:
        assert quotas.person_of(session, key_id, scopes).limits.training_tokens_per_day == (
            defaults.training_tokens_per_day)
