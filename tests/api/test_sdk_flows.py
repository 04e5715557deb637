"""The official tinker 0.38.0 SDK drives every user flow of the wire reference (§8/§9)
against a live gateway serving the tiny model: training, losses, checkpoints, sampling,
REST and close."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from tinker import types

from tests.api.helpers import (
    TEXTS,
    TINY,
    outputs_logprobs,
    reference_logprobs,
    rest,
    rl_datum,
    sft_datum,
)

ADAM = types.AdamParams(learning_rate=5e-3)




def test_training_client_reports_model_info_and_loads_the_tokenizer_offline(trainer, server):
    info = trainer.get_info()
    assert info.model_data.model_name == TINY
    assert info.lora_rank == 4
    tokenizer = trainer.get_tokenizer()
    assert tokenizer.decode(tokenizer.encode("hello world")).strip() == "hello world"


def test_forward_of_a_fresh_adapter_equals_the_base_model_computed_directly(trainer, server):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    out = trainer.forward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    expected = reference_logprobs(server.state.registry.materialize(TINY), ids)
    np.testing.assert_allclose(outputs_logprobs(out)[0], expected, rtol=1e-4, atol=1e-5)
    assert out.metrics["loss:sum"] == pytest.approx(-expected.sum(), rel=1e-4)


def _expected_loss(loss_fn: str, lp: np.ndarray, q: np.ndarray, adv: np.ndarray,
                   config: dict[str, float]) -> float:
    ratio = np.exp(lp - q)
    lo, hi = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
    if loss_fn == "importance_sampling":
        return float(-(ratio * adv).sum())
    if loss_fn == "ppo":
        return float(-np.minimum(ratio * adv, np.clip(ratio, lo, hi) * adv).sum())
    if loss_fn == "cispo":
        return float(-(np.clip(ratio, lo, hi) * lp * adv).sum())
    if loss_fn == "dro":
        beta = config.get("beta", 0.05)
        return float(-(lp * adv - 0.5 * beta * (lp - q) ** 2).sum())
    raise AssertionError(loss_fn)


@pytest.mark.parametrize("loss_fn, config", [
    ("importance_sampling", {}),
    ("ppo", {}),
    ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("cispo", {}),
    ("dro", {"beta": 0.1}),
])
def test_rl_loss_through_the_sdk_matches_its_formula(trainer, server, loss_fn, config):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[1])
    lp = reference_logprobs(server.state.registry.materialize(TINY), ids)
    rng = np.random.default_rng(0)
    q = lp + rng.normal(0, 0.3, size=lp.shape)  # an older policy's logprobs
    adv = rng.normal(0, 1, size=lp.shape)
    datum = rl_datum(ids, q, adv)
    out = trainer.forward_backward([datum], loss_fn, config or None).result()
    expected = _expected_loss(loss_fn, lp, q.astype(np.float32), adv.astype(np.float32),
                              config)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
    np.testing.assert_allclose(outputs_logprobs(out)[0], lp, rtol=1e-4, atol=1e-5)


def test_forward_leaves_weights_alone_and_optim_steps_lower_the_loss(trainer):
    tok = trainer.get_tokenizer()
    batch = [sft_datum(tok, t) for t in TEXTS]
    first = trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    again = trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert again == pytest.approx(first, rel=1e-6)
    losses = []
    for _ in range(6):
        fb = trainer.forward_backward(batch, "cross_entropy")
        step = trainer.optim_step(ADAM)  # submitted before fb's result is fetched
        losses.append(fb.result().metrics["loss:sum"])
        step.result()
    after = trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert losses[0] == pytest.approx(first, rel=1e-5)
    assert after < first * 0.9


def test_save_state_and_load_state_with_and_without_optimizer(client, trainer):
    tok = trainer.get_tokenizer()
    batch = [sft_datum(tok, t) for t in TEXTS]
    for _ in range(2):
        trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(ADAM).result()
    path = trainer.save_state("ckpt-a").result().path
    assert path.endswith("/weights/ckpt-a")
    saved = trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"]

    # Moving away and loading back restores the weights exactly.
    trainer.forward_backward(batch, "cross_entropy").result()
    trainer.optim_step(ADAM).result()
    assert trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"] != saved
    trainer.load_state(path).result()
    assert trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"] == (
        pytest.approx(saved, rel=1e-6))

    # With the optimizer, two clients resumed from the same state take identical steps.
    resumed = [client.create_training_client_from_state_with_optimizer(path).result()
               for _ in range(2)]
    after = []
    for tc in resumed:
        tc.forward_backward(batch, "cross_entropy").result()
        tc.optim_step(ADAM).result()
        after.append(tc.forward(batch, "cross_entropy").result().metrics["loss:sum"])
    assert after[0] == pytest.approx(after[1], rel=1e-6)
    plain = client.create_training_client_from_state(path).result()
    assert plain.forward(batch, "cross_entropy").result().metrics["loss:sum"] == (
        pytest.approx(saved, rel=1e-6))
    # A fresh Adam state takes a different first step than the restored one.
    plain.forward_backward(batch, "cross_entropy").result()
    plain.optim_step(ADAM).result()
    fresh = plain.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    assert fresh != pytest.approx(after[0], rel=1e-6)


def test_sampling_is_reproducible_with_a_seed_and_returns_logprobs(trainer):
    tok = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tok.encode("The quick brown"))
    params = types.SamplingParams(max_tokens=12, temperature=1.0, seed=1234, stop=[])
    first = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    second = sampler.sample(prompt, num_samples=3, sampling_params=params).result()
    assert len(first.sequences) == 3
    assert [s.tokens for s in first.sequences] == [s.tokens for s in second.sequences]
    for seq in first.sequences:
        assert len(seq.tokens) == 12 and seq.stop_reason == "length"
        assert len(seq.logprobs) == 12 and all(lp <= 0 for lp in seq.logprobs)


def test_compute_logprobs_equals_the_training_forward(trainer):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[2])
    sampler = trainer.save_weights_and_get_sampling_client().result()
    prompt_lps = sampler.compute_logprobs(types.ModelInput.from_ints(ids)).result()
    assert prompt_lps[0] is None
    train_lps = outputs_logprobs(trainer.forward([sft_datum(tok, TEXTS[2])],
                                                 "cross_entropy").result())[0]
    np.testing.assert_allclose(np.array(prompt_lps[1:], dtype=float), train_lps,
                               rtol=1e-4, atol=1e-5)


def test_named_sampler_weights_and_a_base_model_sampler(client, trainer):
    tok = trainer.get_tokenizer()
    batch = [sft_datum(tok, t) for t in TEXTS]
    for _ in range(3):
        trainer.forward_backward(batch, "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    path = trainer.save_weights_for_sampler("s1").result().path
    assert path.endswith("/sampler_weights/s1")
    prompt = types.ModelInput.from_ints(tok.encode("A gateway"))
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    tuned = client.create_sampling_client(model_path=path).result()
    base = client.create_sampling_client(base_model=TINY).result()
    tuned_lps = tuned.compute_logprobs(prompt).result()
    base_lps = base.compute_logprobs(prompt).result()
    assert tuned_lps[1:] != pytest.approx(base_lps[1:], rel=1e-6)
    out = base.sample(prompt, num_samples=1, sampling_params=greedy).result()
    assert len(out.sequences[0].tokens) == 8


def test_rest_client_lists_gets_and_deletes_owned_objects(server, api_key, trainer):
    tok = trainer.get_tokenizer()
    trainer.forward_backward([sft_datum(tok, TEXTS[0])], "cross_entropy").result()
    path = trainer.save_state("rest-ckpt").result().path
    sampler_path = trainer.save_weights_for_sampler("rest-sampler").result().path
    rc = rest(server, api_key)
    run_id = trainer.get_info().model_id
    runs = rc.list_training_runs().result()
    assert run_id in [r.training_run_id for r in runs.training_runs]
    run = rc.get_training_run(run_id).result()
    assert run.base_model == TINY and run.lora_rank == 4
    assert run.last_checkpoint is not None
    ckpts = rc.list_checkpoints(run_id).result().checkpoints
    assert {c.checkpoint_id for c in ckpts} >= {"weights/rest-ckpt",
                                                "sampler_weights/rest-sampler"}
    assert path in [c.tinker_path for c in rc.list_user_checkpoints().result().checkpoints]
    info = rc.get_weights_info_by_tinker_path(path).result()
    assert info.base_model == TINY and info.lora_rank == 4 and info.is_lora
    rc.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    rc.unpublish_checkpoint_from_tinker_path(path).result()
    session = rc.get_session(run_id.split(":")[0]).result()
    assert run_id in session.training_run_ids
    assert run_id.split(":")[0] in rc.list_sessions().result().sessions
    rc.delete_checkpoint_from_tinker_path(sampler_path).result()
    remaining = {c.checkpoint_id for c in rc.list_checkpoints(run_id).result().checkpoints}
    assert "sampler_weights/rest-sampler" not in remaining


def test_publishing_an_unreleased_checkpoint_is_refused(server, api_key, trainer):
    path = trainer.save_state("not-released").result().path
    with pytest.raises(tinker.PermissionDeniedError, match="released"):
        rest(server, api_key).publish_checkpoint_from_tinker_path(path).result()


def test_sampler_lookup_returns_its_base_model(server, api_key, client, trainer):
    sampler_path = trainer.save_weights_for_sampler("lookup").result().path
    sc = client.create_sampling_client(model_path=sampler_path).result()
    info = rest(server, api_key).get_sampler(sc._sampling_session_id).result()
    assert info.base_model == TINY and info.model_path == sampler_path


def test_forward_backward_custom_runs_the_loss_in_the_client(trainer):
    """The SDK sends a forward, computes the loss locally, then a cross_entropy backward
    with signed surrogate weights; no code reaches the server."""
    import torch

    tok = trainer.get_tokenizer()
    batch = [sft_datum(tok, t) for t in TEXTS]

    def mean_logprob_loss(data, logprobs_list):
        loss = -torch.stack([lp.mean() for lp in logprobs_list]).sum()
        return loss, {"custom_metric:mean": 1.0}

    before = trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"]
    out = trainer.forward_backward_custom(batch, mean_logprob_loss).result()
    assert "surrogate_loss:sum" in out.metrics and out.metrics["custom_metric:mean"] == 1.0
    trainer.optim_step(ADAM).result()
    assert trainer.forward(batch, "cross_entropy").result().metrics["loss:sum"] < before


def test_a_stop_token_ends_sampling_and_is_returned(trainer):
    tok = trainer.get_tokenizer()
    sampler = trainer.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(tok.encode("The quick brown"))
    free = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0,
                                                          stop=[])).result().sequences[0]
    stop_id = free.tokens[2]
    first = free.tokens.index(stop_id)
    stopped = sampler.sample(prompt, 1, types.SamplingParams(
        max_tokens=6, temperature=0.0, stop=[stop_id])).result().sequences[0]
    assert stopped.stop_reason == "stop"
    assert stopped.tokens == free.tokens[: first + 1]


def test_prompt_logprobs_and_top_k_decode_through_the_sdk(trainer):
    tok = trainer.get_tokenizer()
    ids = tok.encode(TEXTS[0])
    sampler = trainer.save_weights_and_get_sampling_client().result()
    out = sampler.sample(types.ModelInput.from_ints(ids), 1,
                         types.SamplingParams(max_tokens=3, seed=0, stop=[]),
                         include_prompt_logprobs=True, topk_prompt_logprobs=5,
                         topk_sample_logprobs=2).result()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    assert out.topk_prompt_logprobs[0] is None
    for pos, row in enumerate(out.topk_prompt_logprobs[1:], start=1):
        assert len(row) == 5
        lps = [lp for _, lp in row]
        assert lps == sorted(lps, reverse=True)
        chosen = dict(row).get(ids[pos])
        if chosen is not None:  # the actual token, when in the top 5, has its own logprob
            assert chosen == pytest.approx(out.prompt_logprobs[pos], abs=1e-4)
    sampled = out.sequences[0]
    assert [len(row) for row in sampled.topk_logprobs] == [2, 2, 2]
    for token, logprob, row in zip(sampled.tokens, sampled.logprobs, sampled.topk_logprobs,
                                   strict=True):
        if token in dict(row):
            assert dict(row)[token] == pytest.approx(logprob, abs=1e-4)
