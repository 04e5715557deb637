"""The worker runs the next forward_backward of several runs on one base model as one pass:
each run's job is committed on its own with the gradients it would get alone, a bad job
fails alone, and a run's later job waits for its earlier one. Real tiny model, SQLite and
PostgreSQL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sqlalchemy import select
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto

from audit.db import transaction
from audit.models import AuditEntry, Future
from engine.registry import TINY_TEST_MODEL
from engine.worker import Worker

from .conftest import add_owner

RUNS = ("s1:train:0", "s1:train:1", "s1:train:2")


@pytest.fixture
def training(factory, tmp_path, backend, new_adapter, monkeypatch):
    monkeypatch.setattr(backend, "batch_across_runs", True)  # off by default on CPU
    add_owner(factory, RUNS)
    # Each run's adapter and a twin with the same start, trained alone for comparison.
    from engine.values import LoraSpec

    twins = {}
    for n, run in enumerate(RUNS):
        backend.create_adapter(run, LoraSpec(rank=4, seed=n))
        twins[run] = new_adapter(rank=4, seed=n)
    finished: list[str] = []
    worker = Worker(factory, registry=None, checkpoint_root=tmp_path,  # type: ignore[arg-type]
                    on_finished=finished.append)
    worker._backends[TINY_TEST_MODEL] = backend
    yield factory, worker, twins, finished
    for run in RUNS:
        backend.drop_adapter(run)


def _datum(seed: int, vocab: int) -> tt.Datum:
    rng = np.random.default_rng(seed)
    seq = rng.integers(3, vocab, size=11).tolist()
    return tt.Datum(model_input=tt.ModelInput.from_ints(seq[:-1]),
                    loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * 10})


def _submit(factory, run: str, seq_id: int, datum: tt.Datum) -> str:
    body = forward_backward_request_to_proto(tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id=run, seq_id=seq_id)).SerializeToString()
    request_id = f"fb-{run}-{seq_id}"
    with transaction(factory) as session:
        session.add(Future(request_id=request_id, principal_id="p1", kind="forward_backward",
                           model_id=run, seq_id=seq_id, request_format="proto",
                           request_payload=body))
    return request_id


def _alone(backend, adapter: str, datum: tt.Datum) -> None:
    from engine.values import TrainingDatum

    tokens = np.asarray(datum.model_input.to_ints())
    inputs = {k: np.asarray(v.data) for k, v in datum.loss_fn_inputs.items()}
    backend.forward_backward(adapter, [TrainingDatum(tokens, inputs)], "cross_entropy", {},
                             False)


def test_next_jobs_of_several_runs_run_as_one_pass_each_with_its_own_gradients(
        training, backend):
    factory, worker, twins, finished = training
    vocab = backend.vocab_size
    data = {run: _datum(n, vocab) for n, run in enumerate(RUNS[:2])}
    first = {run: _submit(factory, run, 1, datum) for run, datum in data.items()}
    later = _submit(factory, RUNS[0], 2, _datum(9, vocab))  # waits for its run's first job
    oov = tt.Datum(model_input=tt.ModelInput.from_ints([1, vocab + 5]),
                   loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
    bad = _submit(factory, RUNS[2], 1, oov)
    passes = backend.batched_passes
    assert worker.run_once() is True
    assert sorted(finished) == sorted([*first.values(), bad])
    assert backend.batched_passes == passes + 1
    with transaction(factory) as session:
        rows = {f.request_id: f for f in session.scalars(select(Future))}
        audits = [json.loads(a.payload) for a in session.scalars(
            select(AuditEntry).where(AuditEntry.event_type == "engine.forward_backward"))]
    assert all(rows[r].status == "done" for r in first.values())
    assert rows[bad].status == "failed" and rows[bad].error_category == "user"
    assert rows[later].status == "pending"
    assert sorted(a.get("runs_in_pass") for a in audits if "runs_in_pass" in a) == [3, 3]
    for run, datum in data.items():
        _alone(backend, twins[run], datum)
        mine, twin = backend.adapter_snapshot(run), backend.adapter_snapshot(twins[run])
        for key, value in mine.items():
            torch.testing.assert_close(value, twin[key], rtol=1e-4, atol=1e-5)
    assert worker.run_once() is True and rows[later].request_id in finished
    assert worker.run_once() is False


@pytest.mark.parametrize(("value", "expected"), [("auto", None), ("ON", True), ("off", False)])
def test_batching_across_runs_is_read_from_the_environment(monkeypatch, value,
                                                                     expected):
    from gateway.settings import Settings

    monkeypatch.setenv("LORAGATE_BATCH_ACROSS_RUNS", value)
    assert Settings.from_env().batch_across_runs is expected


def test_a_bad_batching_setting_fails_loudly(monkeypatch):
    from gateway.settings import Settings

    monkeypatch.setenv("LORAGATE_BATCH_ACROSS_RUNS", "sometimes")
    with pytest.raises(ValueError, match="auto, on or off"):
        Settings.from_env()
