"""The worker decodes queued sampling requests together: one round takes every queued
request of the base model (the bare base and sampler adapters mixed), each is committed on
its own with what it would get alone, a bad one fails alone, and a request queued while a
round runs joins it. Real tiny model, SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select
from tinker import types as tt
from tinker.proto import tinker_public_pb2 as pb

from audit.db import transaction
from audit.models import Future
from engine import jobs
from engine.registry import TINY_TEST_MODEL
from engine.values import SampleSpec
from engine.worker import Worker

from .conftest import add_owner, train_step


@pytest.fixture
def sampling(factory, tmp_path, backend, new_adapter):
    add_owner(factory)
    adapter = new_adapter(rank=4, seed=5)
    train_step(backend, adapter, seed=5, lr=0.1)
    backend.save_adapter(adapter, tmp_path / "sampler-a", with_optimizer=False)
    finished: list[str] = []
    worker = Worker(factory, registry=None, checkpoint_root=tmp_path,  # type: ignore[arg-type]
                    on_finished=finished.append)
    worker._backends[TINY_TEST_MODEL] = backend
    yield factory, worker, adapter, finished
    for key in list(worker._sampler_adapters):
        backend.drop_adapter(key)


def _submit(factory, seq: int, prompt: list[int], adapter_dir: str | None, **params) -> str:
    body = tt.SampleRequest(
        sampling_session_id="smp", seq_id=seq, num_samples=params.pop("num_samples", 1),
        prompt=tt.ModelInput.from_ints(prompt),
        sampling_params=tt.SamplingParams(stop=[], **params)).model_dump(mode="json")
    job = jobs.SampleJob(sampler_id="smp", base_model=TINY_TEST_MODEL, adapter_dir=adapter_dir,
                         request=body)
    with transaction(factory) as session:
        session.add(Future(request_id=f"smp-{seq}", principal_id="p1", kind="sample",
                           sampler_id="smp", seq_id=seq, request_payload=jobs.dump_job(job)))
    return f"smp-{seq}"


def _tokens(factory, request_id: str) -> list[list[int]]:
    with transaction(factory) as session:
        fut = session.get(Future, request_id)
        assert fut.status == "done", fut.error_message
        resp = pb.SampleResponse.FromString(fut.result_payload)
    return [np.frombuffer(s.tokens, dtype="<i4").tolist() for s in resp.sequences]


def _alone(backend, adapter, prompt, **params) -> list[list[int]]:
    spec = SampleSpec(prompt=tuple(prompt), stop_token_ids=(), stop_strings=(), **params)
    return [s.tokens for s in backend.sample(adapter, spec).sequences]


def test_one_round_decodes_every_queued_request_and_each_gets_what_it_would_alone(
        sampling, backend):
    factory, worker, adapter, finished = sampling
    asks = {
        _submit(factory, 1, [1, 40, 41], None, max_tokens=6, seed=1, num_samples=2):
            (None, [1, 40, 41], {"max_tokens": 6, "seed": 1, "num_samples": 2}),
        _submit(factory, 2, [1, 50, 51, 52, 53, 54], "sampler-a", max_tokens=9, seed=2):
            (adapter, [1, 50, 51, 52, 53, 54], {"max_tokens": 9, "seed": 2}),
        _submit(factory, 3, [1, 60], "sampler-a", max_tokens=4, temperature=0.0):
            (adapter, [1, 60], {"max_tokens": 4, "temperature": 0.0}),
        _submit(factory, 4, [1, 70, 71, 72], None, max_tokens=5, seed=4, top_p=0.9):
            (None, [1, 70, 71, 72], {"max_tokens": 5, "seed": 4, "top_p": 0.9}),
    }
    bad = _submit(factory, 5, [1, 10**6], None, max_tokens=3)  # outside the vocabulary
    assert worker.run_once() is True
    assert sorted(finished) == sorted([*asks, bad])  # all in one round
    for request_id, (which, prompt, params) in asks.items():
        assert _tokens(factory, request_id) == _alone(backend, which, prompt, **params)
    with transaction(factory) as session:
        failed = session.get(Future, bad)
        assert failed.status == "failed" and failed.error_category == "user"
        assert "vocabulary" in failed.error_message or "embedding" in failed.error_message
    assert worker.run_once() is False


def test_a_request_queued_while_a_round_runs_joins_it(sampling, backend):
    factory, worker, adapter, finished = sampling
    long = _submit(factory, 1, [1, 40, 41], None, max_tokens=40, seed=1)
    short = _submit(factory, 2, [1, 42], "sampler-a", max_tokens=2, seed=2)

    def queue_another(request_id: str) -> None:
        finished.append(request_id)
        if request_id == short:  # the long request is still decoding
            _submit(factory, 3, [1, 43, 44, 45, 46], "sampler-a", max_tokens=5, seed=3)

    worker.on_finished = queue_another
    assert worker.run_once() is True
    assert finished == [short, "smp-3", long]
    assert _tokens(factory, "smp-3") == _alone(backend, adapter, [1, 43, 44, 45, 46],
                                               max_tokens=5, seed=3)
    assert _tokens(factory, long) == _alone(backend, None, [1, 40, 41], max_tokens=40, seed=1)
    with transaction(factory) as session:
        assert all(f.status == "done" for f in session.scalars(select(Future)))
