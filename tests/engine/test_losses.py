"""The built-in losses, checked against formulas written out here and an independent LoRA
forward (plain transformers + hooks): loss:sum, per-token logprobs and losses, and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import UserInputError
from engine.losses import elementwise_loss, trained_positions
from engine.values import LOSS_FUNCTIONS, TrainingDatum, resolve_config

from .conftest import ReferenceLora, random_tokens, train_step

CONFIGS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {},  # defaults 0.8 / 1.2
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "dro": {"beta": 0.3},
    "gspo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
}


def hand_loss(loss_fn: str, logp: torch.Tensor, inp: dict, config: dict) -> torch.Tensor:
    """The per-token formulas of tinker-losses.md §4, written independently of engine.losses."""
    if loss_fn == "cross_entropy":
        return -inp.get("weights", torch.ones_like(logp)) * logp
    q, adv = inp["logprobs"], inp["advantages"]
    ratio = torch.exp(logp - q)
    if loss_fn == "importance_sampling":
        return -ratio * adv
    lo = config.get("clip_low_threshold", 0.8)
    hi = config.get("clip_high_threshold", 1.2)
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
    if loss_fn == "cispo":
        return -torch.clamp(ratio, lo, hi).detach() * logp * adv
    if loss_fn == "gspo":  # tinker-docs losses/gspo: s_t = sg(s)·p/sg(p), s over the mask
        mask = inp.get("sequence_ratio_mask")
        chosen = (adv != 0) if mask is None else (mask != 0)
        seq = torch.exp((logp - q)[chosen].mean()) if chosen.any() else torch.ones(())
        s_t = seq.detach() * torch.exp(logp - logp.detach())
        return -torch.minimum(s_t * adv, torch.clamp(s_t, lo, hi) * adv)
    beta = config.get("beta", 0.05)
    return -(logp * adv - 0.5 * beta * (logp - q) ** 2)


def make_data(loss_fn: str, ref: ReferenceLora, vocab: int, seed: int) -> list[TrainingDatum]:
    """Three datums of different lengths; RL datums get sampling logprobs near the model's
    own (so some ratios fall outside the clip range) and mixed-sign advantages."""
    rng = np.random.default_rng(seed)
    data = []
    for i, n in enumerate((9, 5, 12)):
        seq = random_tokens(rng, n + 1, vocab)
        tokens, targets = seq[:-1], seq[1:]
        if loss_fn == "cross_entropy":
            inputs: dict[str, np.ndarray] = {"target_tokens": targets}
            if i != 1:  # datum 1 has no weights: all ones
                inputs["weights"] = rng.normal(0.5, 1.0, n).astype(np.float32)  # some negative
        else:
            with torch.no_grad():
                logp = ref.target_logprobs(tokens, targets).numpy()
            inputs = {
                "target_tokens": targets,
                "logprobs": (logp + rng.normal(0, 0.4, n)).astype(np.float32),
                "advantages": rng.normal(0, 1, n).astype(np.float32),
            }
            if loss_fn == "gspo":  # prompt-like positions; datum 0 names its ratio tokens
                inputs["advantages"][:2] = 0.0
                if i == 0:
                    inputs["sequence_ratio_mask"] = (np.arange(n) % 3 != 0).astype(np.float32)
        data.append(TrainingDatum(tokens, inputs))
    return data


@pytest.mark.parametrize("loss_fn", LOSS_FUNCTIONS)
def test_loss_matches_direct_torch_computation(loss_fn, backend, new_adapter, reference):
    adapter = new_adapter(rank=4, seed=11)
    train_step(backend, adapter)  # non-zero B, so the LoRA path really contributes
    weights = {k: t.requires_grad_() for k, t in backend.adapter_tensors(adapter).items()}
    config = CONFIGS[loss_fn]
    with reference.lora(weights, rank=4):
        data = make_data(loss_fn, reference, backend.vocab_size, seed=5)
        result = backend.forward_backward(adapter, data, loss_fn, config, forward_only=False)
        total = torch.zeros(())
        for datum, out in zip(data, result.outputs, strict=True):
            logp = reference.target_logprobs(datum.tokens, datum.loss_inputs["target_tokens"])
            inputs = {k: torch.as_tensor(v) for k, v in datum.loss_inputs.items()}
            per_token = hand_loss(loss_fn, logp, inputs, config)
            total = total + per_token.sum()
            assert out["logprobs"].dtype == np.float32 and out["logprobs"].shape == (len(logp),)
            np.testing.assert_allclose(out["logprobs"], logp.detach().numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(
                out["elementwise_loss"], per_token.detach().numpy(), rtol=1e-4, atol=1e-5
            )
        expected_grads = torch.autograd.grad(total, list(weights.values()))
    assert result.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5, abs=1e-4)
    snapshot = backend.adapter_snapshot(adapter)
    for key, expected in zip(weights, expected_grads, strict=True):
        torch.testing.assert_close(snapshot[f"grad:{key}"], expected, rtol=1e-3, atol=1e-4)
    assert any(g.abs().max() > 0 for g in expected_grads)


def test_cross_entropy_without_weights_means_all_ones():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    loss = elementwise_loss("cross_entropy", logp, {}, {})
    assert torch.equal(loss, torch.tensor([1.0, 2.0, 0.5]))


def test_ppo_gives_no_gradient_where_the_clipped_term_wins():
    q = torch.zeros(2)
    logp = torch.tensor([0.5, 0.0], requires_grad=True)  # ratio e^0.5 > 1.2, then 1.0
    adv = torch.tensor([1.0, 1.0])
    config = resolve_config("ppo", {})
    loss = elementwise_loss("ppo", logp, {"logprobs": q, "advantages": adv}, config)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert grad[0] == 0 and grad[1] == pytest.approx(-1.0)
    assert loss[0].item() == pytest.approx(-1.2)


def test_cispo_keeps_gradient_on_clipped_tokens():
    logp = torch.tensor([0.5], requires_grad=True)
    inputs = {"logprobs": torch.zeros(1), "advantages": torch.ones(1)}
    loss = elementwise_loss("cispo", logp, inputs, resolve_config("cispo", {}))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert grad.item() == pytest.approx(-1.2)  # −clip(r)·A, the ratio itself is not differentiated


def test_dro_quadratic_term_acts_with_zero_advantage():
    logp = torch.tensor([-1.0])
    inputs = {"logprobs": torch.tensor([-3.0]), "advantages": torch.zeros(1)}
    loss = elementwise_loss("dro", logp, inputs, resolve_config("dro", {"beta": 0.5}))
    assert loss.item() == pytest.approx(0.5 * 0.5 * 4.0)


def test_loss_config_defaults_are_merged():
    assert resolve_config("ppo", {"clip_high_threshold": 1.5}) == {
        "clip_low_threshold": 0.8,
        "clip_high_threshold": 1.5,
    }
    assert resolve_config("dro", None) == {"beta": 0.05}


def test_unknown_loss_config_keys_are_rejected_by_name():
    with pytest.raises(UserInputError, match="epsilon"):
        resolve_config("ppo", {"epsilon": 0.2})
    with pytest.raises(UserInputError, match="beta"):
        resolve_config("cross_entropy", {"beta": 0.1})


@pytest.mark.parametrize(
    "config", [{"clip_low_threshold": 1.3}, {"clip_high_threshold": float("nan")}, {"beta": "x"}]
)
def test_bad_loss_config_values_are_user_errors(config):
    loss_fn = "dro" if "beta" in config else "ppo"
    with pytest.raises(UserInputError):
        resolve_config(loss_fn, config)


def test_unknown_loss_fn_lists_the_supported_ones():
    with pytest.raises(UserInputError, match="cross_entropy"):
        resolve_config("grpo", {})


# -- trained_positions: which targets a loss can train, derived from the loss itself ----------


def rl_inputs(advantages: list[float], logprobs: list[float] | None = None) -> dict:
    n = len(advantages)
    return {"target_tokens": np.arange(n, dtype=np.int64),
            "logprobs": np.asarray(logprobs or [-1.5] * n, dtype=np.float32),
            "advantages": np.asarray(advantages, dtype=np.float32)}


def test_dro_regulariser_trains_every_position_even_with_zero_advantages():
    inputs = rl_inputs([0.0] * 5, [-0.1, -1.0, -3.0, -7.0, -20.0])
    trained = trained_positions("dro", inputs, {"beta": 0.05})
    assert trained.trained.all() and trained.toward.all()
    assert not trained.pushed_down.any()  # at the sampler's own logprobs nothing is pushed down
    assert not trained_positions("dro", inputs, {"beta": 0.0}).trained.any()


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo"])
def test_policy_gradient_losses_follow_the_advantage_sign(loss_fn):
    trained = trained_positions(loss_fn, rl_inputs([2.0, -0.5, 0.0, 1e-3]), {})
    assert trained.toward.tolist() == [True, False, False, True]
    assert trained.against.tolist() == [False, True, False, False]
    assert trained.pushed_down.tolist() == [False, True, False, False]


def test_cross_entropy_weights_and_missing_weights():
    targets = np.arange(4, dtype=np.int64)
    weights = np.asarray([0.0, 1.0, -2.0, 0.5], dtype=np.float32)
    trained = trained_positions("cross_entropy",
                                {"target_tokens": targets, "weights": weights}, None)
    assert trained.toward.tolist() == [False, True, False, True]
    assert trained.against.tolist() == [False, False, True, False]
    assert trained_positions("cross_entropy", {"target_tokens": targets}, {}).toward.all()


def test_ppo_clip_range_is_probed_not_assumed():
    # A ratio clip of [0, 0] makes min(r·A, 0·A) constant for A > 0: nothing is trained.
    inputs = rl_inputs([1.0, 1.0])
    config = {"clip_low_threshold": 0.0, "clip_high_threshold": 0.0}
    assert not trained_positions("ppo", inputs, config).trained.any()
    with pytest.raises(UserInputError, match="clip_low_threshold"):  # refused at the edge
        resolve_config("ppo", {"clip_low_threshold": 2.0})


def test_a_new_loss_registered_in_losses_is_covered(monkeypatch):
    """An entropy-style bonus on every position, whatever the advantages: covered without
    touching trained_positions (it reads the loss, not a list of input names)."""
    import engine.losses as losses

    def entropic(logp, inputs, config):
        return -(logp * inputs["advantages"]) + config["tau"] * logp.square()

    monkeypatch.setitem(losses.LOSSES, "entropic", entropic)
    monkeypatch.setitem(losses.LOSS_CONFIG_DEFAULTS, "entropic", {"tau": 0.01})
    monkeypatch.setattr(losses, "LOSS_FUNCTIONS", (*losses.LOSS_FUNCTIONS, "entropic"))
    trained = trained_positions("entropic", rl_inputs([0.0, 0.0, 1.0]), None)
    assert trained.trained.all()
    assert not trained_positions("entropic", rl_inputs([0.0, 0.0, 1.0]),
                                 {"tau": 0.0}).trained[:2].any()


# -- gspo (tinker-docs losses/gspo: GSPO-token) ------------------------------------------------


def gspo_inputs(q: list[float], adv: list[float], mask: list[float] | None = None) -> dict:
    inputs = {"logprobs": torch.tensor(q, dtype=torch.float64),
              "advantages": torch.tensor(adv, dtype=torch.float64)}
    if mask is not None:
        inputs["sequence_ratio_mask"] = torch.tensor(mask, dtype=torch.float64)
    return inputs


def test_gspo_gives_every_token_the_length_normalised_sequence_ratio():
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    q = [-1.1, -2.05, -0.45, -9.0]  # position 3 is outside the mask
    inputs = gspo_inputs(q, [1.0, 1.0, 1.0, 1.0], [1, 1, 1, 0])
    config = resolve_config("gspo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0})
    loss = elementwise_loss("gspo", logp, inputs, config)
    seq = np.exp(np.mean([0.1, 0.05, -0.05]))  # geometric mean over the masked tokens
    np.testing.assert_allclose(loss.detach().numpy(), [-seq] * 4)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    np.testing.assert_allclose(grad.numpy(), [-seq] * 4)  # own logp's gradient, scaled by s


def test_gspo_clips_the_whole_sequence():
    logp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    inputs = gspo_inputs([-0.5, -0.5, -0.5], [1.0, 1.0, 1.0])  # s = e^0.5 > 1.2
    loss = elementwise_loss("gspo", logp, inputs, resolve_config("gspo", {}))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    assert torch.equal(grad, torch.zeros(3)) and loss[0].item() == pytest.approx(-1.2)
    # Negative advantages keep the unclipped branch (min), so every token still trains.
    inputs = gspo_inputs([-0.5, -0.5, -0.5], [-1.0, -1.0, -1.0])
    loss = elementwise_loss("gspo", logp, inputs, resolve_config("gspo", {}))
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    np.testing.assert_allclose(grad.numpy(), [np.exp(0.5)] * 3)


def test_gspo_without_a_mask_uses_the_positions_with_an_advantage():
    logp = torch.tensor([-4.0, -1.0, -1.0], dtype=torch.float64)
    prompt_like = gspo_inputs([0.0, -1.0, -1.0], [0.0, 1.0, 1.0])  # prompt: q 0, A 0
    loss = elementwise_loss("gspo", logp, prompt_like, resolve_config("gspo", {}))
    np.testing.assert_allclose(loss.numpy(), [0.0, -1.0, -1.0])  # s = 1, prompt ignored
    nothing = gspo_inputs([0.0, 0.0], [0.0, 0.0])  # empty M: s = 1, no NaN
    assert torch.isfinite(elementwise_loss("gspo", logp[:2], nothing,
                                           resolve_config("gspo", {}))).all()


def test_gspo_trains_the_positions_its_advantages_name():
    trained = trained_positions("gspo", rl_inputs([2.0, -0.5, 0.0, 1e-3]), {})
    assert trained.toward.tolist() == [True, False, False, True]
    assert trained.against.tolist() == [False, True, False, False]


def test_stable_reinforce_and_custom_are_refused_by_name():
    from engine.values import check_loss_fn

    with pytest.raises(UserInputError, match=r"stable_reinforce.*record_stability_info"):
        check_loss_fn("stable_reinforce")
    with pytest.raises(UserInputError, match="custom"):
        check_loss_fn("custom")


# -- 2-D (N, K) cross-entropy targets (distillation against a top-k distribution) -------------


def topk_datum(rng: np.random.Generator, n: int, k: int, vocab: int) -> TrainingDatum:
    """Like the cookbook's distillation datums: K candidates per position with
    renormalised teacher weights, zero rows on prompt positions, zero-weight padding."""
    seq = random_tokens(rng, n + 1, vocab)
    targets = random_tokens(rng, n * k, vocab).reshape(n, k)
    targets[:, 0] = seq[1:]
    weights = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
    weights[:2] = 0.0
    targets[3, k - 1], weights[3, k - 1] = 0, 0.0  # padding: id 0, weight 0
    return TrainingDatum(seq[:-1], {"target_tokens": targets, "weights": weights})


def test_two_d_cross_entropy_matches_direct_torch_computation(backend, new_adapter, reference):
    adapter = new_adapter(rank=4, seed=3)
    train_step(backend, adapter)
    weights = {key: t.requires_grad_() for key, t in backend.adapter_tensors(adapter).items()}
    rng = np.random.default_rng(8)
    data = [topk_datum(rng, 9, 4, backend.vocab_size), ce_datum_1d(rng, 6, backend.vocab_size),
            topk_datum(rng, 7, 2, backend.vocab_size)]
    with reference.lora(weights, rank=4):
        result = backend.forward_backward(adapter, data, "cross_entropy", {}, forward_only=False)
        total = torch.zeros(())
        for datum, out in zip(data, result.outputs, strict=True):
            targets = torch.as_tensor(datum.loss_inputs["target_tokens"])
            logits = reference.logits(datum.tokens)
            full = torch.log_softmax(logits, dim=-1)
            logp = (full.gather(-1, targets) if targets.dim() == 2
                    else full.gather(-1, targets[:, None])[:, 0])
            per = -torch.as_tensor(datum.loss_inputs["weights"]) * logp
            total = total + per.sum()
            assert out["logprobs"].shape == tuple(targets.shape)
            np.testing.assert_allclose(out["logprobs"], logp.detach().numpy(), rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(out["elementwise_loss"], per.detach().numpy(),
                                       rtol=1e-4, atol=1e-5)
        expected = torch.autograd.grad(total, list(weights.values()))
    assert result.metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-5, abs=1e-4)
    snapshot = backend.adapter_snapshot(adapter)
    for key, grad in zip(weights, expected, strict=True):
        torch.testing.assert_close(snapshot[f"grad:{key}"], grad, rtol=1e-3, atol=1e-4)


def ce_datum_1d(rng: np.random.Generator, n: int, vocab: int) -> TrainingDatum:
    seq = random_tokens(rng, n + 1, vocab)
    return TrainingDatum(seq[:-1], {"target_tokens": seq[1:],
                                    "weights": rng.random(n).astype(np.float32)})


def test_two_d_targets_with_one_candidate_of_weight_one_equal_the_one_d_loss(backend,
                                                                          new_adapter):
    rng = np.random.default_rng(4)
    seq = random_tokens(rng, 11, backend.vocab_size)
    one_d = TrainingDatum(seq[:-1], {"target_tokens": seq[1:], "weights": np.ones(10, "f4")})
    two_d = TrainingDatum(seq[:-1], {"target_tokens": seq[1:, None],
                                     "weights": np.ones((10, 1), "f4")})
    results, grads = [], []
    for datum in (one_d, two_d):
        adapter = new_adapter(rank=4, seed=5)
        train_step(backend, adapter)
        results.append(backend.forward_backward(adapter, [datum], "cross_entropy", {},
                                                forward_only=False))
        snapshot = backend.adapter_snapshot(adapter)
        grads.append({k: v for k, v in snapshot.items() if k.startswith("grad:")})
    assert results[0].metrics["loss:sum"] == pytest.approx(results[1].metrics["loss:sum"],
                                                           rel=1e-6)
    np.testing.assert_allclose(results[1].outputs[0]["logprobs"][:, 0],
                               results[0].outputs[0]["logprobs"], rtol=1e-6)
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad)


def test_two_d_trained_positions_cover_every_weighted_candidate():
    targets = np.arange(8, dtype=np.int64).reshape(4, 2)
    weights = np.asarray([[0, 0], [0.7, 0.3], [0, 0.2], [-1, 0]], dtype=np.float32)
    trained = trained_positions("cross_entropy",
                                {"target_tokens": targets, "weights": weights}, None)
    assert trained.toward.tolist() == [[False, False], [True, True], [False, True],
                                       [False, False]]
    assert trained.against.tolist() == [[False, False], [False, False], [False, False],
                                        [True, False]]


# -- given logprobs far from any model's: the probes read the model's own range too ------------


def test_dro_with_absurd_logprobs_and_a_tiny_beta_is_read_as_trained_toward():
    """logprobs of 1e18 put every probe around them where float64 cannot see beta·drift,
    while the model's own logp (at most 0) meets a gradient of -A + beta·(logp - 1e18) = -9:
    the text is trained toward, however the advantages say it is pushed down."""
    inputs = rl_inputs([-1.0] * 4, [1e18] * 4)
    trained = trained_positions("dro", inputs, {"beta": 1e-17})
    assert trained.toward.all()


def test_ppo_with_a_clip_range_below_the_given_ratio_is_read_as_trained():
    # logprobs of +20 and a clip of [0, 1e-4]: every offset probe is clipped, the model's
    # own ratio exp(logp - 20) is not.
    inputs = rl_inputs([1.0, 1.0], [20.0, 20.0])
    config = {"clip_low_threshold": 0.0, "clip_high_threshold": 1e-4}
    assert trained_positions("ppo", inputs, config).toward.all()


def test_negative_dro_beta_is_refused_at_the_edge():
    with pytest.raises(UserInputError, match="beta"):
        resolve_config("dro", {"beta": -0.1})


def test_training_is_held_to_what_screening_read(monkeypatch):
    """check_gradient_screened compares the loss's gradient at the model's logp with the
    screening report: a direction the report missed fails the datum."""
    import engine.losses as losses

    logp = torch.tensor([-2.0, -1.0, -0.5])
    inputs = {"weights": torch.tensor([1.0, 0.0, -1.0])}
    losses.check_gradient_screened("cross_entropy", logp, inputs, {})  # read as trained
    nothing = losses.TrainedPositions(*(np.zeros(3, dtype=bool),) * 3)
    monkeypatch.setattr(losses, "trained_positions", lambda *a, **k: nothing)
    with pytest.raises(UserInputError, match=r"position \[0\]"):
        losses.check_gradient_screened("cross_entropy", logp, inputs, {})
    only_toward = losses.TrainedPositions(np.ones(3, dtype=bool), *(np.zeros(3, dtype=bool),) * 2)
    monkeypatch.setattr(losses, "trained_positions", lambda *a, **k: only_toward)
    with pytest.raises(UserInputError, match=r"position \[2\]"):  # pushed down, unread
        losses.check_gradient_screened("cross_entropy", logp, inputs, {})
