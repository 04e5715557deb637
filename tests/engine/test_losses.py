"""The five built-in losses, checked against formulas written out here and an independent LoRA
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
        resolve_config("gspo", {})


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
