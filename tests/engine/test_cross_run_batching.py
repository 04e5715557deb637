"""forward_backward of several runs in one pass (TorchBackend.forward_backward_many): each
row computes with its own run's adapter, each run keeps its own gradients, and every
result — outputs, loss, accumulated gradients — equals running that job alone; a job with
bad input or a non-finite loss fails alone and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backend import TrainingPass
from engine.errors import NonFiniteError, UserInputError
from engine.values import TrainingDatum

from .conftest import ce_datum, train_step
from .test_isolation import bad_requests


@pytest.fixture(autouse=True)
def across_runs(backend, monkeypatch):
    """On: the backend's default is off on CPU, where one pass gains nothing."""
    monkeypatch.setattr(backend, "batch_across_runs", True)


def _twins(backend, new_adapter, specs: list[dict]) -> tuple[list[str], list[str]]:
    """Two identical sets of trained adapters: one runs batched, the other alone."""
    batched, alone = [], []
    for i, spec in enumerate(specs):
        pair = [new_adapter(seed=10 + i, **spec), new_adapter(seed=10 + i, **spec)]
        for adapter in pair:
            train_step(backend, adapter, seed=i, lr=0.05)
        batched.append(pair[0])
        alone.append(pair[1])
    return batched, alone


def _rl(rng: np.random.Generator, n: int, vocab: int) -> TrainingDatum:
    seq = rng.integers(3, vocab, size=n + 1)
    return TrainingDatum(seq[:-1], {"target_tokens": seq[1:],
                                    "logprobs": rng.normal(-3, 0.5, n).astype(np.float32),
                                    "advantages": rng.normal(0, 1, n).astype(np.float32)})


def _jobs(vocab: int) -> list[tuple[list[TrainingDatum], str, dict, bool]]:
    rng = np.random.default_rng(7)
    return [
        ([ce_datum(rng, 12, vocab), ce_datum(rng, 5, vocab)], "cross_entropy", {}, False),
        ([_rl(rng, 9, vocab), _rl(rng, 14, vocab)], "importance_sampling", {}, False),
        ([ce_datum(rng, 20, vocab)], "cross_entropy", {}, True),  # forward only
        ([_rl(rng, 7, vocab)], "ppo", {"clip_low_threshold": 0.8}, False),
    ]


def _assert_same_result(got, want) -> None:
    assert got.metrics["loss:sum"] == pytest.approx(want.metrics["loss:sum"], rel=1e-5,
                                                    abs=1e-5)
    for out, ref in zip(got.outputs, want.outputs, strict=True):
        for key in ("logprobs", "elementwise_loss"):
            np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-5)


def _assert_same_state(backend, a: str, b: str, exact: bool = False) -> None:
    left, right = backend.adapter_snapshot(a), backend.adapter_snapshot(b)
    assert left.keys() == right.keys()
    for key, value in left.items():
        if exact:
            assert torch.equal(value, right[key]), key
        else:
            torch.testing.assert_close(value, right[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")


def test_jobs_of_different_runs_in_one_pass_equal_each_job_alone(backend, new_adapter):
    specs = [{"rank": 4}, {"rank": 8, "train_mlp": False}, {"rank": 4}, {"rank": 2}]
    batched, alone = _twins(backend, new_adapter, specs)
    jobs = _jobs(backend.vocab_size)
    passes = [TrainingPass(a, data, loss, config, fwd)
              for a, (data, loss, config, fwd) in zip(batched, jobs, strict=True)]
    passes.append(TrainingPass(None, jobs[2][0], "cross_entropy", {}, True))  # the base
    results = backend.forward_backward_many(passes)
    assert backend.batched_passes > 0
    for i, (data, loss, config, fwd) in enumerate(jobs):
        _assert_same_result(results[i], backend.forward_backward(alone[i], data, loss, config,
                                                                 fwd))
        _assert_same_state(backend, batched[i], alone[i])
    _assert_same_result(results[4], backend.forward_backward(None, jobs[2][0], "cross_entropy",
                                                             {}, True))
    # Each run's gradients are its own: the runs moved apart from a common start.
    grads = [backend.adapter_snapshot(a) for a in (batched[0], batched[2])]
    assert any(not torch.equal(grads[0][k], grads[1][k]) for k in grads[0] if "grad:" in k)


@pytest.mark.parametrize("case", ["oov input token", "overflowing ratio"])
def test_a_bad_or_non_finite_job_fails_alone_and_changes_nothing(backend, new_adapter, case):
    batched, alone = _twins(backend, new_adapter, [{"rank": 4}, {"rank": 4}, {"rank": 4}])
    bad_data, bad_loss, bad_config = bad_requests(backend.vocab_size)[case]
    good = _jobs(backend.vocab_size)
    passes = [TrainingPass(batched[0], *good[0]),
              TrainingPass(batched[1], bad_data, bad_loss, bad_config, False),
              TrainingPass(batched[2], *good[1])]
    before = backend.adapter_snapshot(batched[1])
    results = backend.forward_backward_many(passes)
    error = NonFiniteError if case == "overflowing ratio" else UserInputError
    assert isinstance(results[1], error) and str(results[1])
    after = backend.adapter_snapshot(batched[1])
    assert all(torch.equal(before[k], after[k]) for k in before)
    for i, job in ((0, good[0]), (2, good[1])):
        _assert_same_result(results[i], backend.forward_backward(alone[i], *job))
        _assert_same_state(backend, batched[i], alone[i])


def test_two_jobs_of_one_run_run_one_after_the_other(backend, new_adapter):
    batched, alone = _twins(backend, new_adapter, [{"rank": 4}])
    jobs = _jobs(backend.vocab_size)
    results = backend.forward_backward_many([TrainingPass(batched[0], *jobs[0]),
                                             TrainingPass(batched[0], *jobs[1])])
    for i in (0, 1):
        _assert_same_result(results[i], backend.forward_backward(alone[0], *jobs[i]))
    _assert_same_state(backend, batched[0], alone[0])


def test_off_the_jobs_run_one_after_the_other_with_the_same_results(backend, new_adapter,
                                                                     monkeypatch):
    monkeypatch.setattr(backend, "batch_across_runs", False)
    batched, alone = _twins(backend, new_adapter, [{"rank": 4}, {"rank": 4}])
    jobs = _jobs(backend.vocab_size)[:2]
    passes = backend.batched_passes
    results = backend.forward_backward_many([TrainingPass(a, *job)
                                             for a, job in zip(batched, jobs, strict=True)])
    assert backend.batched_passes == passes
    for i, job in enumerate(jobs):
        _assert_same_result(results[i], backend.forward_backward(alone[i], *job))
        _assert_same_state(backend, batched[i], alone[i], exact=True)


@pytest.mark.parametrize("together", [True, False])
def test_a_job_training_what_screening_did_not_read_fails_alone(backend, new_adapter,
                                                                monkeypatch, together):
    """Whatever the screening report (engine.losses.trained_positions) misses, the engine
    does not train it: here the report is made to miss everything for one job's loss, and
    that job fails with nothing accumulated while the others train as alone."""
    import engine.losses as losses

    monkeypatch.setattr(backend, "batch_across_runs", together)
    batched, alone = _twins(backend, new_adapter, [{"rank": 4}, {"rank": 4}, {"rank": 4}])
    good = _jobs(backend.vocab_size)
    real = losses.trained_positions

    def blind_to_ppo(loss_fn, inputs, config):
        got = real(loss_fn, inputs, config)
        if loss_fn != "ppo":
            return got
        return losses.TrainedPositions(*(np.zeros_like(got.toward),) * 3)

    monkeypatch.setattr(losses, "trained_positions", blind_to_ppo)
    passes = [TrainingPass(batched[0], *good[0]), TrainingPass(batched[1], *good[3]),
              TrainingPass(batched[2], *good[1])]
    before = backend.adapter_snapshot(batched[1])
    results = backend.forward_backward_many(passes)
    assert isinstance(results[1], UserInputError)
    assert "did not read it as trained" in str(results[1])
    after = backend.adapter_snapshot(batched[1])
    assert all(torch.equal(before[k], after[k]) for k in before)
    for i, job in ((0, good[0]), (2, good[1])):
        _assert_same_result(results[i], backend.forward_backward(alone[i], *job))
        _assert_same_state(backend, batched[i], alone[i])
