"""The futures table is the queue: the worker runs each training run's requests in
seq_id order whatever order they arrived in, resolves failures on their own future only,
and writes each result with one audit row. Uses a recording fake backend (no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto

from audit import log as audit_log
from audit import usage
from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import ApiKey, ClientSession, Future, Principal, TrainingRun
from engine import jobs
from engine.backend import Backend, ForwardBackwardResult
from engine.errors import NonFiniteError
from engine.values import AdamStep, ModelInfo
from engine.worker import Worker
from migrations import upgrade_to_head

INFO = ModelInfo(name="fake", arch="llama", vocab_size=10, max_context=16, tokenizer_dir="/x")


class RecordingBackend(Backend):
    info = INFO

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []
        self.adapters: set[str] = set()

    def create_adapter(self, adapter_id, spec):
        self.adapters.add(adapter_id)

    def has_adapter(self, adapter_id):
        return adapter_id in self.adapters

    def drop_adapter(self, adapter_id):
        self.adapters.discard(adapter_id)

    def forward_backward(self, adapter_id, data, loss_fn, loss_config, forward_only):
        if loss_fn == "importance_sampling":  # stands in for any failure in the job
            raise NonFiniteError("the loss is not finite")
        n = len(data[0].tokens)
        return ForwardBackwardResult(
            outputs=[{"logprobs": np.zeros(n, np.float32),
                      "elementwise_loss": np.zeros(n, np.float32)} for _ in data],
            metrics={"loss:sum": 0.0})

    def optim_step(self, adapter_id, step):
        if step.learning_rate == 0.5:
            raise NonFiniteError("the update is not finite")
        self.calls.append(("optim_step", adapter_id, step.learning_rate))
        return {"learning_rate:mean": step.learning_rate}

    def save_adapter(self, *args):
        raise NotImplementedError

    def load_adapter(self, *args):
        raise NotImplementedError

    def sample(self, *args):
        raise NotImplementedError


@pytest.fixture
def queue(database_url, tmp_path):
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        session.add(Principal(id="p1", name="alice", role="researcher"))
        session.flush()
        session.add(ApiKey(id="k1", principal_id="p1", key_hash="0" * 64, prefix="tml-x"))
        session.flush()
        session.add(ClientSession(id="s1", principal_id="p1"))
        session.flush()
        for n in (0, 1):
            session.add(TrainingRun(id=f"s1:train:{n}", session_id="s1", model_seq_id=n,
                                    principal_id="p1", base_model="fake", lora_rank=4,
                                    lora_config="{}", status="active"))
    backend = RecordingBackend()
    backend.adapters.update({"s1:train:0", "s1:train:1"})
    worker = Worker(factory, registry=None, checkpoint_root=tmp_path)  # type: ignore[arg-type]
    worker._backends["fake"] = backend
    yield factory, worker, backend
    engine.dispose()


def _submit(factory, model_id: str, seq_id: int, lr: float) -> str:
    request_id = f"fut-{model_id}-{seq_id}"
    job = jobs.OptimStepJob(model_id=model_id, step=AdamStep(learning_rate=lr))
    with transaction(factory) as session:
        session.add(Future(request_id=request_id, principal_id="p1", kind="optim_step",
                           model_id=model_id, seq_id=seq_id, status="pending",
                           request_payload=jobs.dump_job(job)))
    return request_id


def _drain(worker: Worker) -> None:
    while worker.run_once():
        pass


def test_requests_of_a_run_execute_in_seq_order_whatever_the_arrival_order(queue):
    factory, worker, backend = queue
    for seq in (3, 1, 2):
        _submit(factory, "s1:train:0", seq, lr=seq / 10)
    _drain(worker)
    assert [c[2] for c in backend.calls] == [0.1, 0.2, 0.3]


def test_a_failed_request_resolves_its_own_future_and_the_queue_moves_on(queue):
    factory, worker, _ = queue
    bad = _submit(factory, "s1:train:0", 1, lr=0.5)
    good_same_run = _submit(factory, "s1:train:0", 2, lr=0.2)
    other_run = _submit(factory, "s1:train:1", 1, lr=0.3)
    _drain(worker)
    with transaction(factory) as session:
        rows = {f.request_id: f for f in session.scalars(select(Future)).all()}
        verified = audit_log.verify(session)
    assert rows[bad].status == "failed" and rows[bad].error_category == "user"
    assert "not finite" in rows[bad].error_message
    assert rows[good_same_run].status == "done" and rows[other_run].status == "done"
    assert json.loads(rows[other_run].result_payload)["metrics"] == {"learning_rate:mean": 0.3}
    assert verified.ok and verified.rows == 3  # one audit row per resolved future


def test_a_run_waits_while_one_of_its_requests_is_running(queue):
    factory, worker, backend = queue
    _submit(factory, "s1:train:0", 1, lr=0.1)
    _submit(factory, "s1:train:0", 2, lr=0.2)
    with transaction(factory) as session:
        session.get(Future, "fut-s1:train:0-1").status = "running"  # held by another worker
    assert worker.run_once() is False
    assert backend.calls == []


def _submit_reserved(factory, seq_id: int, loss_fn: str, tokens: int) -> None:
    """A forward_backward future as admission leaves it: with its quota reservation."""
    datum = tt.Datum(model_input=tt.ModelInput.from_ints(list(range(1, tokens + 1))),
                     loss_fn_inputs={"target_tokens": [1] * tokens, "weights": [1.0] * tokens,
                                     "logprobs": [-1.0] * tokens, "advantages": [1.0] * tokens}
                     if loss_fn == "importance_sampling" else
                     {"target_tokens": [1] * tokens, "weights": [1.0] * tokens})
    body = forward_backward_request_to_proto(tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
        model_id="s1:train:0", seq_id=seq_id)).SerializeToString()
    reservation = usage.Reservation(api_key_id="k1", day=usage.utc_day(),
                                    training_run_id="s1:train:0", training_tokens=tokens)
    with transaction(factory) as session:
        usage.record_reservation(session, reservation)
        session.add(Future(request_id=f"fut-{seq_id}", principal_id="p1",
                           kind="forward_backward", model_id="s1:train:0", seq_id=seq_id,
                           status="pending", request_format="proto", request_payload=body,
                           api_key_id="k1", quota_reservation=reservation.to_json()))


def test_finished_work_is_charged_and_failed_work_is_refunded_exactly_once(queue):
    factory, worker, _ = queue
    _submit_reserved(factory, 1, "cross_entropy", tokens=5)
    _submit_reserved(factory, 2, "importance_sampling", tokens=7)
    with transaction(factory) as session:
        held = usage.day_totals(session, "k1", usage.utc_day())
    assert (held["training_tokens"], held["training_tokens_reserved"]) == (0, 12)
    _drain(worker)
    worker.requeue_interrupted(any_worker=True)  # nothing is running: settles nothing a second time
    with transaction(factory) as session:
        after = usage.day_totals(session, "k1", usage.utc_day())
        statuses = [f.status for f in session.scalars(select(Future).order_by(Future.seq_id))]
        per_run = usage.usage_by_run(session, ["s1:train:0"])["s1:train:0"]
    assert statuses == ["done", "failed"]
    assert (after["training_tokens"], after["training_tokens_reserved"]) == (5, 0)
    assert per_run["training_tokens"] == 5
