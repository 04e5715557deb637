"""Durable run state (engine.run_state): after every committed job a run's adapter, AdamW
state and accumulated gradients are on disk, named on the run's row. A new worker process
(here: a new Worker with a fresh backend, as after `kill -9`) restores the run and goes on
bit for bit; a job left `running` goes back in the queue. Leases (engine.leases): a run's
jobs go to the worker that holds it while its heartbeat lasts; then another takes the run
over from disk, and a worker that did not run the run's last job restores it instead of
using a stale copy."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, update
from tinker import types as tt
from tinker.proto.request_conv import forward_backward_request_to_proto

from audit.db import make_engine, make_sessionmaker, transaction
from audit.models import (
    AuditEntry,
    ClientSession,
    Future,
    Principal,
    TrainingRun,
    WorkerHeartbeat,
    utcnow,
)
from engine import jobs, run_state
from engine.registry import TINY_TEST_MODEL, ModelRegistry
from engine.values import AdamStep, LoraSpec
from engine.worker import Worker
from migrations import upgrade_to_head

RUN = "s1:train:0"
TOKENS = [[5, 17, 42, 9, 3, 77, 12], [8, 8, 31, 64, 2, 19, 4]]
_requests = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def factory(database_url):
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with transaction(factory) as session:
        session.add(Principal(id="p1", name="alice", role="researcher"))
        session.flush()
        session.add(ClientSession(id="s1", principal_id="p1"))
        session.flush()
        session.add(TrainingRun(id=RUN, session_id="s1", model_seq_id=0, principal_id="p1",
                                base_model=TINY_TEST_MODEL, lora_rank=4, lora_config="{}"))
    yield factory
    engine.dispose()


def new_worker(factory, models_dir: Path, root: Path, worker_id: str = "w1",
               snapshot_every: int = 8) -> Worker:
    """A worker with a backend of its own: what a new process starts with."""
    return Worker(factory, ModelRegistry(models_dir), root, worker_id=worker_id,
                  snapshot_every=snapshot_every)


def submit(factory, kind: str, seq: int, payload: bytes, fmt: str = "json",
           run: str = RUN) -> str:
    request_id = f"req-{next(_requests)}"
    with transaction(factory) as session:
        session.add(Future(request_id=request_id, principal_id="p1", kind=kind, model_id=run,
                           seq_id=seq, status="pending", request_format=fmt,
                           request_payload=payload))
    return request_id


def create(factory, run: str = RUN) -> str:
    if run != RUN:
        with transaction(factory) as session:
            session.add(TrainingRun(id=run, session_id="s1", model_seq_id=int(run[-1]),
                                    principal_id="p1", base_model=TINY_TEST_MODEL,
                                    lora_rank=4, lora_config="{}"))
    job = jobs.CreateAdapterJob(model_id=run, base_model=TINY_TEST_MODEL,
                                lora=LoraSpec(rank=4, seed=3))
    return submit(factory, "create_model", 0, jobs.dump_job(job), run=run)


def forward_backward(factory, seq: int, forward_only: bool = False) -> str:
    data = [tt.Datum(model_input=tt.ModelInput.from_ints(t[:-1]),
                     loss_fn_inputs={"target_tokens": t[1:], "weights": [1.0] * (len(t) - 1)})
            for t in TOKENS]
    msg = forward_backward_request_to_proto(tt.ForwardBackwardRequest(
        forward_backward_input=tt.ForwardBackwardInput(data=data, loss_fn="cross_entropy"),
        model_id=RUN, seq_id=seq))
    msg.forward_only = forward_only
    body = msg.SerializeToString()
    return submit(factory, "forward_backward", seq, body, fmt="proto")


def optim_step(factory, seq: int) -> str:
    job = jobs.OptimStepJob(model_id=RUN, step=AdamStep(learning_rate=0.05))
    return submit(factory, "optim_step", seq, jobs.dump_job(job))


def drain(worker: Worker) -> None:
    while worker.run_once():
        pass


def statuses(factory) -> list[str]:
    with transaction(factory) as session:
        return [f.status for f in session.scalars(select(Future).order_by(Future.seq_id,
                                                                           Future.created_at))]


def row_state(factory) -> run_state.DurableState:
    with transaction(factory) as session:
        run = session.get(TrainingRun, RUN)
        assert run is not None and run.durable_weights_seq is not None
        return run_state.DurableState(run.durable_weights_seq, run.durable_log_seq)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_new_process_restores_weights_adam_state_and_pending_gradients(
        factory, models_dir, tmp_path):
    first = new_worker(factory, models_dir, tmp_path)
    create(factory)
    forward_backward(factory, 1)
    optim_step(factory, 2)
    forward_backward(factory, 3)  # gradients pending when the process dies
    drain(first)
    assert statuses(factory) == ["done"] * 4
    assert row_state(factory) == run_state.DurableState(0, 3)  # snapshot 0, then a log
    assert files(tmp_path) == ["log-1.forward_backward", "log-2.optim_step",
                               "log-3.forward_backward", "weights-0"]
    before = first.backend(TINY_TEST_MODEL).adapter_snapshot(RUN)

    second = new_worker(factory, models_dir, tmp_path)  # first's memory is gone
    assert_same(second.training_backend(RUN).adapter_snapshot(RUN), before)


def files(root: Path) -> list[str]:
    return sorted(p.name for p in run_state.run_dir(root, RUN).iterdir())


def test_snapshots_come_every_few_steps_and_bound_what_is_kept(factory, models_dir, tmp_path):
    worker = new_worker(factory, models_dir, tmp_path, snapshot_every=2)
    create(factory)
    for seq in range(1, 9):  # fb, optim, fb, optim, ...
        (forward_backward if seq % 2 else optim_step)(factory, seq)
        drain(worker)
        if seq == 3:
            assert files(tmp_path) == ["log-1.forward_backward", "log-2.optim_step",
                                       "log-3.forward_backward", "weights-0"]
    assert row_state(factory) == run_state.DurableState(8)  # every 2nd step snapshots
    assert files(tmp_path) == ["weights-8"]
    before = worker.backend(TINY_TEST_MODEL).adapter_snapshot(RUN)
    restored = new_worker(factory, models_dir, tmp_path)
    assert_same(restored.training_backend(RUN).adapter_snapshot(RUN), before)


@pytest.mark.parametrize("snapshot_every", [1, 8])
def test_training_goes_on_after_a_restart_exactly_as_without_one(factory, models_dir, tmp_path,
                                                                 snapshot_every):
    def losses_after(restart_at: int | None, root: Path) -> list[float]:
        def new() -> Worker:
            return new_worker(factory, models_dir, root, snapshot_every=snapshot_every)

        worker = new()
        with transaction(factory) as session:
            session.execute(Future.__table__.delete())
            session.get(TrainingRun, RUN).durable_weights_seq = None
        create(factory)
        ids = []
        for step in range(3):
            if step == restart_at:
                worker = new()
            drain(worker)
            ids.append(forward_backward(factory, 2 * step + 1))
            optim_step(factory, 2 * step + 2)
        drain(worker)
        return [loss_sum(factory, i) for i in ids]

    plain = losses_after(None, tmp_path / "a")
    assert plain[2] < plain[0]  # it trains
    assert losses_after(1, tmp_path / "b") == plain
    assert losses_after(2, tmp_path / "c") == plain


def loss_sum(factory, request_id: str) -> float:
    """The loss a forward_backward reported, from its audit row."""
    with transaction(factory) as session:
        entry = session.scalars(select(AuditEntry).where(
            AuditEntry.request_id == request_id, AuditEntry.event_type == "engine.forward_backward")
        ).one()
        return float(json.loads(entry.payload)["loss_sum"])


def test_a_job_left_running_by_a_dead_process_runs_again_and_never_twice(
        factory, models_dir, tmp_path):
    reference = new_worker(factory, models_dir, tmp_path / "ref")
    create(factory)
    forward_backward(factory, 1)
    drain(reference)
    expected = reference.backend(TINY_TEST_MODEL).adapter_snapshot(RUN)
    with transaction(factory) as session:
        session.execute(Future.__table__.delete())
        session.get(TrainingRun, RUN).durable_weights_seq = None

    dying = new_worker(factory, models_dir, tmp_path / "run")
    create(factory)
    drain(dying)
    forward_backward(factory, 1)
    claimed = dying._claim()  # running under w1 when the process is killed
    assert claimed is not None and statuses(factory) == ["done", "running"]

    other = new_worker(factory, models_dir, tmp_path / "run", worker_id="w2")
    assert other.requeue_interrupted() == 0  # not its own: another worker may be alive
    restarted = new_worker(factory, models_dir, tmp_path / "run")
    assert restarted.requeue_interrupted() == 1
    drain(restarted)
    assert statuses(factory) == ["done", "done"]
    assert_same(restarted.backend(TINY_TEST_MODEL).adapter_snapshot(RUN), expected)
    with transaction(factory) as session:
        rows = session.scalars(select(AuditEntry).where(
            AuditEntry.event_type == "engine.requeued")).all()
    assert len(rows) == 1 and rows[0].payload.count(claimed.request_id) == 1


def expire_lease(factory) -> None:
    """As if the lease holder's heartbeat had stopped long enough."""
    with transaction(factory) as session:
        session.get(TrainingRun, RUN).lease_expires_at = utcnow() - dt.timedelta(seconds=1)


def test_a_run_is_leased_to_the_worker_that_runs_it_until_the_lease_lapses(
        factory, models_dir, tmp_path):
    a = new_worker(factory, models_dir, tmp_path, "wa")
    b = new_worker(factory, models_dir, tmp_path, "wb")
    create(factory)
    forward_backward(factory, 1)
    drain(a)
    optim_step(factory, 2)
    assert b.run_once() is False  # the run is a's while a's lease lasts
    expire_lease(factory)
    drain(b)  # b takes the run over: restores it from disk, steps; a's copy is now stale
    assert statuses(factory) == ["done"] * 3
    forward_backward(factory, 3, forward_only=True)
    expire_lease(factory)
    drain(a)  # a notices that the run moved on and restores it instead of using its copy
    assert_same(a.backend(TINY_TEST_MODEL).adapter_snapshot(RUN),
                b.backend(TINY_TEST_MODEL).adapter_snapshot(RUN))
    with transaction(factory) as session:
        by = [f.worker_id for f in session.scalars(select(Future).order_by(Future.seq_id))]
    assert by == ["wa", "wa", "wb", "wa"]


def test_what_a_dead_worker_was_running_is_requeued_by_a_live_one(factory, models_dir,
                                                                   tmp_path):
    dead = new_worker(factory, models_dir, tmp_path, "w-dead")
    live = new_worker(factory, models_dir, tmp_path, "w-live")
    dead.lease_seconds = live.lease_seconds = 5.0
    dead.heartbeat()
    create(factory)
    drain(dead)
    forward_backward(factory, 1)
    assert dead._claim() is not None  # then the process dies
    live.heartbeat()
    assert statuses(factory) == ["done", "running"]  # its heartbeat is recent: alive
    with transaction(factory) as session:
        session.get(WorkerHeartbeat, "w-dead").heartbeat_at = utcnow() - dt.timedelta(
            seconds=6)
    expire_lease(factory)
    live.heartbeat()
    assert statuses(factory) == ["done", "pending"]
    drain(live)
    assert statuses(factory) == ["done", "done"]
    assert row_state(factory) == run_state.DurableState(0, 1)


def claimed_by(factory) -> dict[str, str]:
    with transaction(factory) as session:
        return {f.model_id: f.worker_id for f in session.scalars(select(Future))}


def test_new_runs_go_to_the_live_worker_running_fewer_and_never_wait_past_a_lease(
        factory, models_dir, tmp_path):
    a = new_worker(factory, models_dir, tmp_path, "wa")
    b = new_worker(factory, models_dir, tmp_path, "wb")
    create(factory)
    drain(a)  # alone: a takes the first run
    a.heartbeat()
    b.heartbeat()
    create(factory, "s1:train:2")
    assert a.run_once() is False  # a runs one run, b none: the new run is b's
    drain(b)
    create(factory, "s1:train:3")  # one each: whoever claims first
    drain(a)
    create(factory, "s1:train:4")  # a runs two, b one: b's
    assert a.run_once() is False
    with transaction(factory) as session:  # ... unless b has left it waiting a lease long
        session.execute(update(Future).where(Future.model_id == "s1:train:4").values(
            created_at=utcnow() - dt.timedelta(seconds=a.lease_seconds + 1)))
    drain(a)
    assert claimed_by(factory) == {RUN: "wa", "s1:train:2": "wb", "s1:train:3": "wa",
                                   "s1:train:4": "wa"}
    forward_backward(factory, 1)  # a run's own worker always takes its jobs
    drain(a)
    assert statuses(factory)[-1] == "done"


def test_a_dead_peer_does_not_hold_new_runs_back(factory, models_dir, tmp_path):
    a = new_worker(factory, models_dir, tmp_path, "wa")
    idle = new_worker(factory, models_dir, tmp_path, "w-gone")
    create(factory)
    drain(a)
    a.heartbeat()
    idle.heartbeat()
    with transaction(factory) as session:
        session.get(WorkerHeartbeat, "w-gone").heartbeat_at = utcnow() - dt.timedelta(
            seconds=a.lease_seconds + 1)
    create(factory, "s1:train:2")
    drain(a)
    assert claimed_by(factory)["s1:train:2"] == "wa"
