"""Tenants are isolated in numbers: bad or non-finite requests of one adapter raise a user error
and change nothing anywhere; training one adapter never moves another or the base model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch

from engine.errors import NonFiniteError, UserInputError
from engine.torch_backend import TorchBackend
from engine.values import AdamStep, SampleSpec, TrainingDatum

from .conftest import ce_datum, train_step

Snapshot = dict[str, dict[str, torch.Tensor]]


def snapshot_all(backend: TorchBackend, adapters: list[str]) -> Snapshot:
    return {a: backend.adapter_snapshot(a) for a in adapters}


def assert_unchanged(before: Snapshot, after: Snapshot) -> None:
    assert before.keys() == after.keys()
    for adapter, tensors in before.items():
        assert tensors.keys() == after[adapter].keys(), adapter
        for key, value in tensors.items():
            assert torch.equal(value, after[adapter][key]), f"{adapter} {key} changed"


def probe(backend: TorchBackend) -> list[TrainingDatum]:
    return [ce_datum(np.random.default_rng(99), 16, backend.vocab_size)]


def outputs(backend: TorchBackend, adapter: str | None) -> list[np.ndarray]:
    result = backend.forward_backward(adapter, probe(backend), "cross_entropy", {}, True)
    return [out["logprobs"] for out in result.outputs]


@pytest.fixture
def tenants(backend: TorchBackend, new_adapter) -> list[str]:
    """Two trained adapters, each with pending gradients and Adam state."""
    adapters = [new_adapter(seed=1), new_adapter(seed=2, train_mlp=False)]
    for i, adapter in enumerate(adapters):
        train_step(backend, adapter, seed=i)
        data = [ce_datum(np.random.default_rng(50 + i), 8, backend.vocab_size)]
        backend.forward_backward(adapter, data, "cross_entropy", {}, False)
    return adapters


def test_training_one_adapter_never_changes_another_or_the_base(backend, tenants):
    a, b = tenants
    base_before, b_before = outputs(backend, None), outputs(backend, b)
    snap_b = backend.adapter_snapshot(b)
    for seed in range(3):
        train_step(backend, a, seed=seed, lr=0.1)
    assert_unchanged({b: snap_b}, {b: backend.adapter_snapshot(b)})
    np.testing.assert_array_equal(outputs(backend, b)[0], b_before[0])
    np.testing.assert_array_equal(outputs(backend, None)[0], base_before[0])


def bad_requests(vocab: int) -> dict[str, tuple[list[TrainingDatum], str, dict]]:
    """Requests made of valid value objects (engine.values refuses malformed ones when they
    are built: tests/engine/test_values.py) that the engine must still refuse: ids outside
    the model (its one guard) and a loss that is not finite."""
    rng = np.random.default_rng(0)
    good = ce_datum(rng, 6, vocab)
    tokens, targets = good.tokens, good.loss_inputs["target_tokens"]
    ones = np.ones(6, np.float32)

    def ce(**inputs):
        return [
            good,
            TrainingDatum(
                inputs.pop("tokens", tokens), {"target_tokens": targets, "weights": ones, **inputs}
            ),
        ]

    rl = {"target_tokens": targets, "logprobs": np.zeros(6, np.float32), "advantages": ones}
    return {
        "oov input token": (ce(tokens=np.array([1, 2, vocab, 4, 5, 6])), "cross_entropy", {}),
        "negative input token": (ce(tokens=np.array([1, 2, -1, 4, 5, 6])), "cross_entropy", {}),
        "oov target token": (ce(target_tokens=targets + vocab), "cross_entropy", {}),
        "too long": (
            [TrainingDatum(np.ones(513, np.int64), {"target_tokens": np.ones(513, np.int64)})],
            "cross_entropy",
            {},
        ),
        # exp(logp - q) overflows: the loss is inf (and 0·inf = NaN); computed, then refused.
        "overflowing ratio": (
            [TrainingDatum(tokens, {**rl, "logprobs": np.full(6, -1e30, np.float32)})],
            "importance_sampling",
            {},
        ),
    }


@pytest.mark.parametrize("case", list(bad_requests(384)))
def test_bad_request_raises_and_leaves_every_adapter_bit_identical(backend, tenants, case):
    data, loss_fn, config = bad_requests(backend.vocab_size)[case]
    before = snapshot_all(backend, tenants)
    base_before = outputs(backend, None)
    for forward_only in (False, True):
        with pytest.raises(UserInputError) as info:
            backend.forward_backward(tenants[0], data, loss_fn, config, forward_only)
        assert str(info.value)
    assert_unchanged(before, snapshot_all(backend, tenants))
    np.testing.assert_array_equal(outputs(backend, None)[0], base_before[0])


def test_non_finite_loss_is_a_non_finite_error(backend, tenants):
    data, loss_fn, config = bad_requests(backend.vocab_size)["overflowing ratio"]
    with pytest.raises(NonFiniteError):
        backend.forward_backward(tenants[0], data, loss_fn, config, False)


def test_non_finite_update_rolls_back_weights_and_adam_state(backend, tenants):
    a, _ = tenants
    before = snapshot_all(backend, tenants)
    # Decoupled decay p·(1 − lr·wd) with lr·wd = 1e60 overflows to inf/NaN in fp32.
    with pytest.raises(NonFiniteError):
        backend.optim_step(a, AdamStep(learning_rate=1e30, weight_decay=1e30))
    assert_unchanged(before, snapshot_all(backend, tenants))
    backend.optim_step(a, AdamStep(learning_rate=1e-3))  # the run can go on
    assert not any(g.any() for k, g in backend.adapter_snapshot(a).items() if k[:5] == "grad:")


def test_oov_token_in_sampling_is_refused_and_changes_nothing(backend, tenants):
    before = snapshot_all(backend, tenants)
    with pytest.raises(UserInputError, match="vocabulary"):
        backend.sample(tenants[0], SampleSpec(prompt=(1, backend.vocab_size + 7), max_tokens=2))
    assert_unchanged(before, snapshot_all(backend, tenants))


def steps(backend: TorchBackend, adapter: str, seed: int) -> list[Callable[[], object]]:
    """A short training run as separate requests; each returns what it observed."""
    rng = np.random.default_rng(seed)
    batches = [
        [ce_datum(rng, 9, backend.vocab_size), ce_datum(rng, 4, backend.vocab_size)]
        for _ in range(2)
    ]

    def forward_backward(data: list[TrainingDatum]) -> object:
        result = backend.forward_backward(adapter, data, "cross_entropy", {}, False)
        return [result.metrics, *[o["logprobs"].tolist() for o in result.outputs]]

    def optim_step(lr: float) -> object:
        return backend.optim_step(adapter, AdamStep(learning_rate=lr))

    def sample(seed: int) -> object:
        spec = SampleSpec(prompt=(1, 5, 9), max_tokens=5, num_samples=2, seed=seed)
        return [s.tokens for s in backend.sample(adapter, spec).sequences]

    def weights() -> object:
        return {k: v.tolist() for k, v in backend.adapter_tensors(adapter).items()}

    return [
        partial(forward_backward, batches[0]),
        partial(optim_step, 0.02),
        partial(sample, 0),
        partial(forward_backward, batches[1]),
        partial(optim_step, 0.04),
        partial(sample, 1),
        weights,
    ]


def test_interleaving_two_tenants_gives_the_same_results_as_running_each_alone(
    backend, new_adapter
):
    alone = [[step() for step in steps(backend, new_adapter(seed=s), s)] for s in (1, 2)]
    mixed: list[list[object]] = [[], []]
    scripts = [steps(backend, new_adapter(seed=s), s) for s in (1, 2)]
    for pair in zip(*scripts, strict=True):
        for i, step in enumerate(pair):
            mixed[i].append(step())
    assert mixed == alone
