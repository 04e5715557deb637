"""Adapters, gradient accumulation and the AdamW step of TorchBackend on the tiny model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.errors import UnknownAdapterError, UserInputError
from engine.torch_backend import TorchBackend
from engine.values import AdamStep, LoraSpec, TrainingDatum

from .conftest import ce_datum, train_step


def grads_of(backend: TorchBackend, adapter: str) -> dict[str, torch.Tensor]:
    return {k[5:]: v for k, v in backend.adapter_snapshot(adapter).items() if k.startswith("grad:")}


def two_datums(backend: TorchBackend, seed: int = 3) -> list[TrainingDatum]:
    rng = np.random.default_rng(seed)
    return [ce_datum(rng, 10, backend.vocab_size), ce_datum(rng, 6, backend.vocab_size)]


def test_same_seed_gives_identical_adapter_init_and_leaves_global_rng_alone(backend, new_adapter):
    rng_before = torch.get_rng_state()
    a, b, c = new_adapter(seed=7), new_adapter(seed=7), new_adapter(seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    ta, tb, tc = (backend.adapter_tensors(x) for x in (a, b, c))
    for key in ta:
        assert torch.equal(ta[key], tb[key])
        if ".lora_B." in key:
            assert not ta[key].any()  # B starts at zero: a fresh adapter equals the base
        else:
            assert not torch.equal(ta[key], tc[key])


def test_fresh_adapter_computes_exactly_the_base_model(backend, new_adapter):
    data = two_datums(backend)
    base = backend.forward_backward(None, data, "cross_entropy", {}, forward_only=True)
    fresh = backend.forward_backward(new_adapter(), data, "cross_entropy", {}, forward_only=True)
    for x, y in zip(base.outputs, fresh.outputs, strict=True):
        np.testing.assert_array_equal(x["logprobs"], y["logprobs"])


@pytest.mark.parametrize(
    ("flags", "modules"),
    [
        (
            {"train_attn": True, "train_mlp": False, "train_unembed": False},
            {"q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        (
            {"train_attn": False, "train_mlp": True, "train_unembed": False},
            {"gate_proj", "up_proj", "down_proj"},
        ),
        ({"train_attn": False, "train_mlp": False, "train_unembed": True}, {"lm_head"}),
    ],
)
def test_train_flags_choose_the_target_modules(backend, new_adapter, flags, modules):
    keys = backend.adapter_tensors(new_adapter(rank=2, **flags))
    found = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys}
    assert found == modules
    assert all(t.dtype == torch.float32 for t in keys.values())


def test_rank_sets_the_lora_shapes(backend, new_adapter):
    keys = backend.adapter_tensors(new_adapter(rank=3, train_mlp=False, train_unembed=False))
    q_a = keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    q_b = keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert q_a.shape == (3, 64) and q_b.shape == (64, 3)


def test_a_rank_beyond_the_hidden_size_is_refused_by_the_engine(backend):
    """The model's own bound; every other rule on a LoraSpec holds when it is built
    (tests/engine/test_values.py)."""
    with pytest.raises(UserInputError, match="between 1 and 64"):
        backend.create_adapter("never-created", LoraSpec(rank=10_000))
    assert not backend.has_adapter("never-created")


def test_creating_an_existing_adapter_is_refused(backend, new_adapter):
    adapter = new_adapter()
    with pytest.raises(UserInputError, match="already"):
        backend.create_adapter(adapter, LoraSpec(rank=4))


def test_forward_does_not_change_the_accumulator(backend, new_adapter):
    adapter = new_adapter()
    train_step(backend, adapter)
    backend.forward_backward(adapter, two_datums(backend), "cross_entropy", {}, False)
    before = backend.adapter_snapshot(adapter)
    backend.forward_backward(adapter, two_datums(backend, 9), "cross_entropy", {}, True)
    after = backend.adapter_snapshot(adapter)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_forward_and_forward_backward_return_the_same_outputs(backend, new_adapter):
    adapter = new_adapter()
    train_step(backend, adapter)
    data = two_datums(backend)
    fwd = backend.forward_backward(adapter, data, "cross_entropy", {}, True)
    fwdbwd = backend.forward_backward(adapter, data, "cross_entropy", {}, False)
    assert fwd.metrics == fwdbwd.metrics
    for x, y in zip(fwd.outputs, fwdbwd.outputs, strict=True):
        np.testing.assert_array_equal(x["logprobs"], y["logprobs"])


def test_gradients_accumulate_across_calls_like_one_call_with_both_datums(backend, new_adapter):
    first, second = new_adapter(seed=1), new_adapter(seed=1)
    train_step(backend, first)
    train_step(backend, second)
    d1, d2 = two_datums(backend)
    r1 = backend.forward_backward(first, [d1], "cross_entropy", {}, False)
    r2 = backend.forward_backward(first, [d2], "cross_entropy", {}, False)
    both = backend.forward_backward(second, [d1, d2], "cross_entropy", {}, False)
    total = r1.metrics["loss:sum"] + r2.metrics["loss:sum"]
    assert both.metrics["loss:sum"] == pytest.approx(total, rel=1e-6)
    g1, g2 = grads_of(backend, first), grads_of(backend, second)
    for key in g1:
        torch.testing.assert_close(g1[key], g2[key], rtol=1e-3, atol=1e-4)


def test_small_micro_batches_give_the_same_result_as_one_batch(backend, tiny_dir, new_adapter):
    adapter = new_adapter(seed=2)
    train_step(backend, adapter)
    small = TorchBackend(tiny_dir, backend.info, device="cpu", max_batch_tokens=8)
    small.create_adapter("x", LoraSpec(rank=4, seed=2))
    train_step(small, "x")
    data = [*two_datums(backend), *two_datums(backend, 4)]
    big_result = backend.forward_backward(adapter, data, "cross_entropy", {}, False)
    small_result = small.forward_backward("x", data, "cross_entropy", {}, False)
    assert small_result.metrics["loss:sum"] == pytest.approx(big_result.metrics["loss:sum"])
    for x, y in zip(big_result.outputs, small_result.outputs, strict=True):
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
    g_big, g_small = grads_of(backend, adapter), grads_of(small, "x")
    for key in g_big:
        torch.testing.assert_close(g_big[key], g_small[key], rtol=1e-3, atol=1e-4)


def hand_adamw(
    weights: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
    steps: list[AdamStep],
) -> dict[str, torch.Tensor]:
    """torch.optim.AdamW run by hand: one step per (grads, AdamStep) pair."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in weights.items()}
    opt = torch.optim.AdamW(list(params.values()))
    for grad, step in zip(grads, steps, strict=True):
        for key, param in params.items():
            param.grad = grad[key].clone()
        if step.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), step.grad_clip_norm)
        for group in opt.param_groups:
            group.update(
                lr=step.learning_rate,
                betas=(step.beta1, step.beta2),
                eps=step.eps,
                weight_decay=step.weight_decay,
            )
        opt.step()
    return {k: p.detach() for k, p in params.items()}


def test_optim_step_matches_hand_run_adamw_with_decay_and_clipping(backend, new_adapter):
    adapter = new_adapter(seed=3)
    steps = [
        AdamStep(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=0.5),
        AdamStep(learning_rate=3e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.01),
    ]
    start = backend.adapter_tensors(adapter)
    seen_grads = []
    for i, step in enumerate(steps):
        backend.forward_backward(adapter, two_datums(backend, 10 + i), "cross_entropy", {}, False)
        seen_grads.append(grads_of(backend, adapter))
        metrics = backend.optim_step(adapter, step)
        assert metrics["learning_rate:mean"] == step.learning_rate
        assert all(":" in key for key in metrics)
        assert all(not g.any() for g in grads_of(backend, adapter).values())  # zeroed
    expected = hand_adamw(start, seen_grads, steps)
    got = backend.adapter_tensors(adapter)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-7)


def test_grad_norm_metric_is_the_unclipped_global_norm(backend, new_adapter):
    adapter = new_adapter()
    backend.forward_backward(adapter, two_datums(backend), "cross_entropy", {}, False)
    norm = torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in grads_of(backend, adapter).values()])
    )
    metrics = backend.optim_step(adapter, AdamStep(grad_clip_norm=1e-3))
    assert metrics["grad_norm:mean"] == pytest.approx(norm.item(), rel=1e-5)


def test_base_model_cannot_be_trained_and_unknown_adapters_are_named(backend):
    data = two_datums(backend)
    with pytest.raises(UserInputError, match="base model"):
        backend.forward_backward(None, data, "cross_entropy", {}, forward_only=False)
    with pytest.raises(UnknownAdapterError, match="nope"):
        backend.forward_backward("nope", data, "cross_entropy", {}, forward_only=True)
    with pytest.raises(UnknownAdapterError):
        backend.optim_step("nope", AdamStep())


def test_dropping_the_last_adapter_restores_the_bare_model(backend, tiny_dir):
    fresh = TorchBackend(tiny_dir, backend.info, device="cpu")
    data = two_datums(backend)
    before = fresh.forward_backward(None, data, "cross_entropy", {}, True)
    fresh.create_adapter("a", LoraSpec(rank=2, seed=0))
    train_step(fresh, "a")
    fresh.drop_adapter("a")
    fresh.drop_adapter("a")  # dropping twice is a no-op
    assert not fresh.has_adapter("a")
    after = fresh.forward_backward(None, data, "cross_entropy", {}, True)
    assert before.metrics == after.metrics
    fresh.create_adapter("b", LoraSpec(rank=2, seed=0))  # PEFT wraps again
    assert fresh.has_adapter("b")


def test_adapter_spec_is_kept(backend, new_adapter):
    adapter = new_adapter(rank=2, seed=5, train_unembed=False)
    assert backend.adapter_spec(adapter) == dataclasses.replace(
        LoraSpec(rank=2, seed=5), train_unembed=False
    )
