"""Each per-key scope and quota, enforced through the official SDK on SQLite and
PostgreSQL: refusals are immediate 403s that name the scope or quota (and when a quota
frees up), and nothing refused is charged or half-done."""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest
import tinker
from tinker import types

from tests.api.helpers import TEXTS, TINY, rest, service, sft_datum

GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0, stop=[])


def usage(server, key: str, **params) -> dict:
    resp = httpx.get(f"{server.base_url}/api/v1/usage", headers={"X-API-Key": key},
                     params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def adapter_digest(server, path: str) -> str:
    """SHA-256 of a checkpoint's adapter tensors, read from the server's checkpoint store."""
    run, kind, name = path.removeprefix("tinker://").split("/")
    directory = server.state.settings.checkpoint_root / run.replace(":", "_") / kind / name
    return hashlib.sha256((directory / "adapter.safetensors").read_bytes()).hexdigest()


def refused(match: str):
    """The SDK raises at once (403 is never retried) with the gateway's reason."""
    return pytest.raises(tinker.PermissionDeniedError, match=match)


def test_a_base_model_outside_the_keys_scope_is_refused_for_training_and_sampling(server):
    sc = service(server, server.create_key(scopes={"base_models": ["some/other-model"]}))
    with refused(f"may not use base model '{TINY}'.*some/other-model"):
        sc.create_lora_training_client(base_model=TINY, rank=4).result()
    with refused("may not use base model"):
        sc.create_sampling_client(base_model=TINY).result()


def test_a_rank_above_the_keys_cap_is_refused_and_one_at_the_cap_trains(server):
    sc = service(server, server.create_key(scopes={"max_lora_rank": 4}))
    with refused("LoRA rank 8 exceeds this API key's maximum of 4"):
        sc.create_lora_training_client(base_model=TINY, rank=8).result()
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    assert trainer.get_info().model_data.model_name == TINY
    sc.close("success").result()


def test_a_loss_outside_the_keys_scope_is_refused_and_an_allowed_one_runs(server):
    sc = service(server, server.create_key(scopes={"losses": ["cross_entropy"]}))
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    rl = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                     loss_fn_inputs={"target_tokens": ids[1:],
                                     "logprobs": [-1.0] * (len(ids) - 1),
                                     "advantages": [1.0] * (len(ids) - 1)})
    with refused("may not use the loss 'importance_sampling'; it may use: cross_entropy"):
        trainer.forward_backward([rl], "importance_sampling").result()
    trainer.forward_backward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    sc.close("success").result()


def test_top_k_logprobs_are_capped_by_the_keys_scope(server):
    # The cap holds for adapters too (tests/security/test_sampling_caps.py).
    sc = service(server, server.create_key(scopes={"max_base_topk_logprobs": 2}))
    base = sc.create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints([5, 6, 7, 8])
    with refused("top-k logprobs of 5 exceed this API key's maximum of 2"):
        base.sample(prompt, 1, GREEDY, include_prompt_logprobs=True,
                    topk_prompt_logprobs=5).result()
    ok = base.sample(prompt, 1, GREEDY, include_prompt_logprobs=True,
                     topk_prompt_logprobs=2).result()
    assert len(ok.topk_prompt_logprobs[1]) == 2
    sc.close("success").result()


def test_a_day_budget_exhausted_mid_run_refuses_the_next_step_and_keeps_earlier_work(server):
    probe = service(server, server.create_key())
    tok = probe.create_lora_training_client(base_model=TINY, rank=4).result().get_tokenizer()
    probe.close("success").result()
    batch = [sft_datum(tok, t) for t in TEXTS]
    per_call = sum(d.model_input.length for d in batch)
    key = server.create_key(scopes={"training_tokens_per_day": 2 * per_call + per_call // 2})
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4, seed=0).result()
    for _ in range(2):
        trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    before = trainer.save_weights_for_sampler("before").result().path
    start = time.monotonic()
    with refused(r"quota training_tokens_per_day exceeded: this request needs "
                 rf"{per_call} training tokens, and {2 * per_call} of today's .* are used or "
                 r"reserved; it resets at \d{4}-\d\d-\d\dT00:00:00Z"):
        trainer.forward_backward(batch, "cross_entropy").result()
    assert time.monotonic() - start < 1.0
    # The run is intact: nothing of the refused call was queued or run, the run still saves
    # and samples, and its weights are exactly those of the two admitted steps.
    after = trainer.save_weights_for_sampler("after").result().path
    assert adapter_digest(server, after) == adapter_digest(server, before)
    sampler = sc.create_sampling_client(model_path=after).result()
    assert len(sampler.sample(types.ModelInput.from_ints(tok.encode("A gateway")), 1,
                              GREEDY).result().sequences[0].tokens) == 4
    [mine] = usage(server, key)["keys"]
    assert mine["today"]["training_tokens"] == 2 * per_call  # the refusal cost nothing
    assert mine["today"]["training_tokens_reserved"] == 0
    sc.close("success").result()


def test_sampled_tokens_are_reserved_at_admission_and_charged_as_generated(server):
    key = server.create_key(scopes={"sampled_tokens_per_day": 10})
    sc = service(server, key)
    base = sc.create_sampling_client(base_model=TINY).result()
    prompt = types.ModelInput.from_ints([5, 6, 7])
    out = base.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0,
                                                      stop=[])).result()
    assert len(out.sequences[0].tokens) == 6
    with refused("quota sampled_tokens_per_day exceeded: this request needs 8 sampled tokens"):
        base.sample(prompt, 2, types.SamplingParams(max_tokens=4, stop=[])).result()
    today = usage(server, key)["keys"][0]["today"]
    assert (today["sampled_tokens"], today["sampled_tokens_reserved"]) == (6, 0)
    base.sample(prompt, 1, types.SamplingParams(max_tokens=4, stop=[])).result()
    sc.close("success").result()


def test_too_many_concurrent_runs_are_refused_until_a_session_closes(server):
    key = server.create_key(scopes={"concurrent_training_runs": 1})
    first = service(server, key)
    first.create_lora_training_client(base_model=TINY, rank=4).result()
    second = service(server, key)
    with refused(r"quota concurrent_training_runs exceeded: 1 of 1 training runs are alive; "
                 r"a run frees its slot"):
        second.create_lora_training_client(base_model=TINY, rank=4).result()
    first.close("success").result()
    second.create_lora_training_client(base_model=TINY, rank=4).result()
    second.close("success").result()


def test_stored_checkpoints_are_capped_and_deleting_one_frees_a_slot(server):
    key = server.create_key(scopes={"checkpoints_stored": 1})
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    path = trainer.save_state("one").result().path
    with refused("quota checkpoints_stored exceeded: 1 of 1 checkpoints"):
        trainer.save_state("two").result()
    rest(server, key).delete_checkpoint_from_tinker_path(path).result()
    trainer.save_state("two").result()
    sc.close("success").result()


def test_usage_is_shown_to_the_owner_and_to_auditors_but_not_to_other_researchers(server):
    owner_name = f"owner-{time.time_ns()}"
    key = server.create_key(owner=owner_name)
    sc = service(server, key)
    trainer = sc.create_lora_training_client(base_model=TINY, rank=4).result()
    tok = trainer.get_tokenizer()
    datum = sft_datum(tok, TEXTS[1])
    trainer.forward_backward([datum], "cross_entropy").result()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2, types.SamplingParams(
        max_tokens=3, stop=[])).result()
    mine = usage(server, key)
    [run] = mine["training_runs"]
    assert run["training_tokens"] == datum.model_input.length
    assert (run["prefill_tokens"], run["sampled_tokens"]) == (3, 6)
    assert run["checkpoints"] == 1 and run["checkpoint_bytes"] > 0
    assert mine["keys"][0]["total"]["training_tokens"] == datum.model_input.length
    other = server.create_key()
    resp = httpx.get(f"{server.base_url}/api/v1/usage", params={"owner": owner_name},
                     headers={"X-API-Key": other}, timeout=10)
    assert resp.status_code == 403 and "auditors, admins" in resp.json()["detail"]
    auditor = usage(server, server.create_key(role="auditor"), owner=owner_name)
    assert auditor["training_runs"] == mine["training_runs"]
    everyone = usage(server, server.create_key(role="admin"), owner="*")
    assert run["training_run_id"] in {r["training_run_id"] for r in everyone["training_runs"]}
    sc.close("success").result()
