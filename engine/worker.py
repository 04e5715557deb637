"""The worker: drains the futures table and runs each job on a Backend.

Claims pending futures one at a time — per training run strictly in `seq_id` order, and
never while another future of the same run is running — runs them, and writes the
result, the domain rows the job produced (checkpoints, samplers, run status) and an audit
entry in one transaction. Sampling requests are the exception: a round decodes every
queued request of one base model together, taking in new ones every few decode steps
(the backend's `batch_decoder`), and commits each as it finishes. With a backend that
batches across runs, a forward_backward takes the next forward_backward of other runs on
its base model into one pass (`forward_backward_many`), each committed on its own. A job
that fails changes nothing and resolves its own future only: other runs are unaffected.
Between jobs it sweeps expired checkpoints.

Must not import fastapi, gateway or policy. Runs as a thread inside `loragate serve`
(embedded default) or as its own process (`loragate worker`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from audit import log as audit_log
from audit import usage
from audit.db import transaction
from audit.models import Checkpoint, Future, Sampler, TrainingRun, utcnow
from engine import jobs, leases, run_state, wire
from engine.backend import (
    ForwardBackwardResult,
    SampledSequence,
    SampleResult,
    SamplingBatch,
    TrainingPass,
)
from engine.errors import UnknownAdapterError, UserInputError
from engine.registry import fast_tokenizer
from engine.run_state import DurableState
from engine.sweeper import BeforeDelete, sweep_expired_checkpoints

if TYPE_CHECKING:
    from engine.backend import Backend
    from engine.registry import ModelRegistry
    from engine.values import SampleSpec

logger = logging.getLogger("loragate.worker")

SAMPLER_ADAPTER_CACHE = 8
# forward_backward jobs of up to this many runs on one base model run as one pass.
TRAINING_RUNS_PER_PASS = 8
# Sampling requests decode together (engine.decoding): a round takes up to this many
# samples at once, looks for newly queued requests of its base model every few decode
# steps, and stops taking them after a while so other jobs get the worker.
SAMPLE_ROWS = 64
ADMIT_EVERY_STEPS = 4
SAMPLING_ROUND_SECONDS = 20.0
# A run's weights and AdamW state are snapshotted every this many optimizer steps; the jobs
# in between are logged and replayed on a restore (engine.run_state).
SNAPSHOT_EVERY = 8
# What a caller gets in place of a sampled sequence the output screen withheld: fixed, so
# it is recognisable, and decoded from tokens like any sample.
WITHHELD_NOTICE = "[loragate: this sample was withheld by output screening]"

# Jobs the engine does not define itself (the release evaluation lives in evals, above the
# engine): kind -> handler(worker, future) -> Outcome, injected by whoever builds the worker.
JobHandler = Callable[["Worker", Future], "Outcome"]

# Output screening, injected by whoever builds the worker (the gateway wires policy's
# screener): for each text, the categories it is flagged in (empty: fine) and the evidence
# for the audit row (scores and thresholds).
OutputScreen = Callable[[list[str]], list[tuple[list[str], dict[str, Any]]]]

# The engine's own job kinds can run again after a crash (runs restore from durable state,
# engine.run_state), so a restarted worker puts them back in the queue.
RERUNNABLE_KINDS = frozenset(jobs.ENGINE_JOB_KINDS)


@dataclass
class Outcome:
    """What a finished job writes: the future's result plus its side effects."""

    result_format: str
    result: bytes
    audit: dict[str, Any] = field(default_factory=dict)
    apply: Callable[[Session], None] | None = None
    # Tokens actually used, charged against the key's reservation (audit.usage.settle).
    used: dict[str, int] = field(default_factory=dict)
    # A job that decided against the caller (e.g. a quarantined export): the future fails
    # with this user-facing message, but `apply` and the audit entry still commit.
    error: str | None = None
    # Run once the outcome has committed (e.g. a signed audit checkpoint).
    after_commit: list[Callable[[], None]] = field(default_factory=list)


def json_result(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


class Worker:
    def __init__(
        self,
        factory: sessionmaker[Session],
        registry: ModelRegistry,
        checkpoint_root: Path,
        *,
        worker_id: str = "worker-0",
        snapshot_every: int = SNAPSHOT_EVERY,
        lease_seconds: float = leases.LEASE_SECONDS,
        device: str | None = None,
        batch_across_runs: bool | None = None,
        on_finished: Callable[[str], None] | None = None,
        idle_poll_seconds: float = 0.1,
        output_screen: OutputScreen | None = None,
        extra_jobs: dict[str, JobHandler] | None = None,
        sweep_seconds: float = 0.0,
        before_sweep_delete: BeforeDelete | None = None,
    ) -> None:
        self.factory = factory
        self.registry = registry
        self.checkpoint_root = Path(checkpoint_root)
        self.worker_id = worker_id
        self.snapshot_every = snapshot_every
        self.lease_seconds = lease_seconds
        self.device = device
        # Whether loaded backends run jobs of different runs in one pass (None: their
        # default, by device).
        self.batch_across_runs = batch_across_runs
        self.on_finished = on_finished
        self.idle_poll_seconds = idle_poll_seconds
        self.output_screen = output_screen
        self.extra_jobs = dict(extra_jobs or {})
        # Expired checkpoints are swept this often between jobs (0: never).
        self.sweep_seconds = sweep_seconds
        self.before_sweep_delete = before_sweep_delete
        self._next_sweep = 0.0
        self.wake = threading.Event()
        self._backends: dict[str, Backend] = {}
        self._sampler_adapters: OrderedDict[str, str] = OrderedDict()
        # The durable state each loaded run's adapter holds in memory (engine.run_state):
        # a job whose run's row names another state restores the run first.
        self._in_memory: dict[str, DurableState] = {}

    # ------------------------------------------------------------------ loop

    def run_forever(self, stop: threading.Event) -> None:
        logger.info("worker %s started", self.worker_id)
        self.heartbeat()
        beats = leases.heartbeat_thread(self.heartbeat, self.lease_seconds, stop)
        try:
            self._loop(stop)
        finally:
            # No thread of ours may still run while the interpreter tears down.
            beats.join(timeout=self.lease_seconds)
        logger.info("worker %s stopped", self.worker_id)

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._maybe_sweep()
            try:
                worked = self.run_once()
            except Exception:  # a broken database must not kill the thread silently
                logger.exception("worker loop error")
                worked = False
            if not worked:
                self.wake.wait(self.idle_poll_seconds)
                self.wake.clear()

    def _maybe_sweep(self) -> None:
        """Delete expired checkpoints when a sweep is due (engine.sweeper)."""
        if self.sweep_seconds <= 0 or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.sweep_seconds
        try:
            sweep_expired_checkpoints(self.factory, self.checkpoint_root,
                                      actor=f"worker:{self.worker_id}",
                                      before_delete=self.before_sweep_delete)
        except Exception:  # a failed sweep is retried at the next one
            logger.exception("sweeping expired checkpoints failed")

    def run_once(self) -> bool:
        """Claim and run one future (a sampling request: a round of them); False when
        nothing was claimable."""
        claimed = self._claim()
        if claimed is None:
            return False
        if claimed.kind == "sample":
            self._sampling_round(claimed)
        elif claimed.kind == "forward_backward":
            self._training_round(claimed)
        else:
            self._run(claimed)
        return True

    def heartbeat(self) -> None:
        """Say this worker is alive (renewing its runs' leases, engine.leases) and requeue
        what dead workers were running. Errors are logged: the next beat tries again."""
        try:
            now = utcnow()
            with transaction(self.factory) as session:
                leases.beat(session, self.worker_id, self.lease_seconds, now)
            with transaction(self.factory) as session:
                orphans = leases.orphaned_futures(session, self.worker_id, self.lease_seconds,
                                                  now)
                self._requeue(session, orphans, "its worker stopped sending heartbeats")
        except Exception:
            logger.exception("worker heartbeat failed")

    def requeue_interrupted(self, *, any_worker: bool = False) -> int:
        """Futures left `running` by a previous process of this worker (its worker id), or
        with `any_worker` by any (embedded mode: the only worker), go back in the queue:
        their runs restore from durable state, so running them again is idempotent. Jobs
        the engine does not define (release evaluations) fail instead. Returns how many."""
        with transaction(self.factory) as session:
            stmt = select(Future).where(Future.status == "running")
            if not any_worker:
                stmt = stmt.where(Future.worker_id == self.worker_id)
            rows = session.scalars(stmt.order_by(Future.created_at)).all()
            self._requeue(session, rows, "interrupted by a worker restart")
            return len(rows)

    def _requeue(self, session: Session, rows: Sequence[Future], reason: str) -> None:
        """Put running futures whose worker is gone back in the queue (one audit row);
        those the engine cannot run again fail."""
        requeued = []
        for fut in rows:
            if fut.kind not in RERUNNABLE_KINDS:
                self._mark_failed(session, fut, "the server restarted while this request "
                                  "was running; submit it again", "server")
                continue
            requeued.append({"request_id": fut.request_id, "kind": fut.kind,
                             "worker_id": fut.worker_id})
            fut.status, fut.worker_id, fut.claimed_at = "pending", None, None
        if requeued:
            audit_log.append(session, actor=f"worker:{self.worker_id}",
                             event_type="engine.requeued", decision="info",
                             subject=f"{len(requeued)} futures",
                             payload={"reason": reason, "futures": requeued})

    def backend(self, base_model: str) -> Backend:
        if base_model not in self._backends:
            from engine.torch_backend import load_backend

            logger.info("loading base model %s", base_model)
            backend = load_backend(self.registry, base_model, self.device)
            if self.batch_across_runs is not None:
                backend.batch_across_runs = self.batch_across_runs
            self._backends[base_model] = backend
        return self._backends[base_model]

    # ------------------------------------------------------------------ claim/finish

    def _claim(self) -> Future | None:
        with transaction(self.factory) as session:
            now = utcnow()
            stmt = (
                select(Future)
                .where(Future.status == "pending", _next_of_its_run(),
                       self._claimable(session, now))
                .order_by(Future.created_at, Future.seq_id)
                .limit(1)
            )
            if session.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Future)
            fut = session.scalars(stmt).first()
            if fut is None:
                return None
            fut.status, fut.worker_id, fut.claimed_at = "running", self.worker_id, now
            if fut.model_id:
                leases.take(session, fut.model_id, self.worker_id, self.lease_seconds, now)
            session.flush()
            session.expunge(fut)
            return fut

    def _claimable(self, session: Session, now: dt.datetime) -> ColumnElement[bool]:
        """The lease filter of this worker's claims (new runs only while it is not busier
        than another live worker: engine.leases)."""
        takes_new = leases.takes_new_runs(session, self.worker_id, self.lease_seconds, now)
        return leases.claimable_by(self.worker_id, now, takes_new_runs=takes_new,
                                   lease_seconds=self.lease_seconds)

    def _claim_training(self, first: Future) -> list[Future]:
        """Claim the next forward_backward of other runs on `first`'s base model (each its
        run's next job, as `_claim` would take it), to run in one pass with it."""
        with transaction(self.factory) as session:
            base_model = session.scalar(select(TrainingRun.base_model)
                                        .where(TrainingRun.id == first.model_id))
            now = utcnow()
            same_base = select(TrainingRun.id).where(TrainingRun.base_model == base_model)
            stmt = (select(Future)
                    .where(Future.status == "pending", Future.kind == "forward_backward",
                           Future.model_id != first.model_id,
                           Future.model_id.in_(same_base), _next_of_its_run(),
                           self._claimable(session, now))
                    .order_by(Future.created_at, Future.seq_id)
                    .limit(TRAINING_RUNS_PER_PASS - 1))
            if session.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Future)
            claimed = list(session.scalars(stmt).all())
            for fut in claimed:
                fut.status, fut.worker_id, fut.claimed_at = "running", self.worker_id, now
                leases.take(session, fut.model_id or "", self.worker_id, self.lease_seconds,
                            now)
            session.flush()
            for fut in claimed:
                session.expunge(fut)
            return claimed

    def _claim_samples(self, base_model: str, rows: int) -> list[Future]:
        """Claim queued sampling requests of `base_model` whose samples fit in `rows`,
        oldest first."""
        with transaction(self.factory) as session:
            stmt = (select(Future)
                    .where(Future.status == "pending", Future.kind == "sample",
                           leases.claimable_by(self.worker_id, utcnow()))
                    .order_by(Future.created_at).limit(SAMPLE_ROWS))
            if session.get_bind().dialect.name == "postgresql":
                stmt = stmt.with_for_update(skip_locked=True, of=Future)
            claimed = []
            for fut in session.scalars(stmt).all():
                job = jobs.load_job(jobs.SampleJob, fut.request_payload)
                samples = _samples_asked(job)
                if job.base_model != base_model or samples > rows:
                    continue
                rows -= samples
                fut.status, fut.worker_id, fut.claimed_at = "running", self.worker_id, utcnow()
                claimed.append(fut)
            session.flush()
            for fut in claimed:
                session.expunge(fut)
            return claimed

    def _run(self, fut: Future) -> None:
        started = time.perf_counter()
        try:
            outcome = self._execute(fut)
        except Exception as exc:
            self._fail(fut, exc)
            return
        self._commit(fut, outcome, started)
        self._notify(fut)

    def _commit(self, fut: Future, outcome: Outcome, started: float) -> None:
        """Commit a job's outcome, then run its after-commit hooks."""
        outcome.audit["seconds"] = round(time.perf_counter() - started, 4)
        if not self._finish_done(fut, outcome):
            outcome.after_commit.clear()
        for hook in outcome.after_commit:
            try:
                hook()
            except Exception:  # the outcome is committed; a hook failing must not undo it
                logger.exception("after-commit hook of %s failed", fut.request_id)

    def _notify(self, fut: Future) -> None:
        if self.on_finished is not None:
            self.on_finished(fut.request_id)

    def _finish_done(self, fut: Future, outcome: Outcome) -> bool:
        """Commit the outcome; False when the future was resolved elsewhere (nothing
        committed)."""
        if outcome.error is None:
            values: dict[str, Any] = {"status": "done", "result_format": outcome.result_format,
                                      "result_payload": outcome.result}
        else:
            values = {"status": "failed", "error_message": outcome.error,
                      "error_category": "user"}
        with transaction(self.factory) as session:
            resolved = session.execute(
                update(Future)
                .where(Future.request_id == fut.request_id, Future.status == "running")
                .values(finished_at=utcnow(), **values)
            )
            if resolved.rowcount != 1:  # type: ignore[attr-defined]
                logger.warning("future %s was resolved elsewhere; dropping its result",
                               fut.request_id)
                return False
            if outcome.apply is not None:
                outcome.apply(session)
            # The run's row before its usage counter, the order admission locks them in
            # (screening's tally, then the quota reservation): the other order deadlocked
            # on PostgreSQL with a forward_backward being admitted for the same run.
            self._touch_run(session, fut)
            usage.settle(session, fut.quota_reservation, outcome.used)
            audit_log.append(
                session, actor=f"worker:{self.worker_id}", event_type=f"engine.{fut.kind}",
                decision="done" if outcome.error is None else "failed",
                subject=fut.model_id or fut.sampler_id or "",
                request_id=fut.request_id, payload={"seq_id": fut.seq_id, **outcome.audit},
            )
        return True

    def _finish_failed(self, fut: Future, message: str, category: str) -> None:
        with transaction(self.factory) as session:
            row = session.get(Future, fut.request_id)
            if row is not None and row.status == "running":
                self._mark_failed(session, row, message, category)
            if fut.kind in ("create_model", "load_weights_new") and fut.model_id:
                session.execute(update(TrainingRun).where(TrainingRun.id == fut.model_id)
                                .values(status="failed"))

    def _mark_failed(self, session: Session, fut: Future, message: str, category: str) -> None:
        fut.status, fut.error_message, fut.error_category = "failed", message, category
        fut.finished_at = utcnow()
        usage.settle(session, fut.quota_reservation, None)  # failed work is not charged
        audit_log.append(
            session, actor=f"worker:{self.worker_id}", event_type=f"engine.{fut.kind}",
            decision="failed", subject=fut.model_id or fut.sampler_id or "",
            request_id=fut.request_id,
            payload={"seq_id": fut.seq_id, "category": category, "error": message[:500]},
        )

    def _touch_run(self, session: Session, fut: Future) -> None:
        if fut.model_id:
            session.execute(update(TrainingRun).where(TrainingRun.id == fut.model_id)
                            .values(last_request_time=utcnow()))

    # ------------------------------------------------------------------ jobs

    def _execute(self, fut: Future) -> Outcome:
        handler = {
            "create_model": self._create_model,
            "load_weights_new": self._load_weights,
            "load_weights": self._load_weights,
            "forward_backward": self._forward_backward,
            "optim_step": self._optim_step,
            "save_weights": self._save,
            "save_weights_for_sampler": self._save,
        }.get(fut.kind)
        if handler is not None:
            return handler(fut)
        extra = self.extra_jobs.get(fut.kind)
        if extra is None:
            raise UserInputError(f"this worker cannot run {fut.kind!r} jobs")
        return extra(self, fut)

    def training_backend(self, model_id: str) -> Backend:
        """The backend holding the run's adapter as its last committed job left it: restored
        from durable state when this worker holds another state of it, or none (it
        restarted, or another worker ran the run's last job)."""
        with transaction(self.factory) as session:
            row = session.execute(select(
                TrainingRun.base_model, TrainingRun.durable_weights_seq,
                TrainingRun.durable_log_seq).where(TrainingRun.id == model_id)).first()
        if row is None:
            raise UserInputError(f"training run {model_id} does not exist")
        backend = self.backend(row.base_model)
        if backend.keeps_durable_state and row.durable_weights_seq is not None:
            state = DurableState(row.durable_weights_seq, row.durable_log_seq)
            if self._in_memory.get(model_id) != state or not backend.has_adapter(model_id):
                self._in_memory.pop(model_id, None)
                self._restore(backend, model_id, state)
                self._in_memory[model_id] = state
            return backend
        if not backend.has_adapter(model_id):
            raise UnknownAdapterError(
                f"training run {model_id} is no longer loaded on this server (it restarted); "
                "continue from your last checkpoint with create_training_client_from_state"
            )
        return backend

    def _durable(self, outcome: Outcome, model_id: str, state: DurableState) -> Outcome:
        """Name `state` (its files written) on the run's row in the outcome's transaction;
        once committed, memory holds it and older files go."""
        outcome.apply = _then(outcome.apply, _record_durable(model_id, state))

        def committed() -> None:
            self._in_memory[model_id] = state
            run_state.prune(self.checkpoint_root, model_id, state)

        outcome.after_commit.append(committed)
        return outcome

    def _restore(self, backend: Backend, model_id: str, state: DurableState) -> None:
        """Load the run's snapshot and replay the jobs logged after it."""
        root = self.checkpoint_root
        run_state.load_snapshot(backend, root, model_id, state)
        for job in run_state.logged_jobs(root, model_id, state):
            if job.kind == "forward_backward":
                call = wire.decode_forward_backward(job.payload)
                backend.forward_backward(model_id, call.data, call.loss_fn, call.loss_config,
                                         False)
            else:
                backend.optim_step(model_id, jobs.load_job(jobs.OptimStepJob, job.payload).step)
        logger.info("restored run %s from durable state %s", model_id, state)

    def _weights_changed(self, backend: Backend, outcome: Outcome, model_id: str,
                         seq: int) -> Outcome:
        """After a job that set the run's weights (create, load, a due optim_step)."""
        if not backend.keeps_durable_state:
            return outcome
        self._in_memory.pop(model_id, None)  # memory is ahead of the row until the commit
        state = run_state.snapshot(backend, self.checkpoint_root, model_id, seq)
        return self._durable(outcome, model_id, state)

    def _logged(self, outcome: Outcome, fut: Future, model_id: str) -> Outcome:
        """After a forward_backward or optim_step of a run that keeps durable state (its
        state in memory `held`): log the job; an optim_step takes a snapshot when due."""
        held = self._in_memory.pop(model_id)  # memory is ahead of the row until the commit
        state = run_state.log_job(self.checkpoint_root, model_id, held, fut.seq_id or 0,
                                  fut.kind, fut.request_payload)
        return self._durable(outcome, model_id, state)

    def _create_model(self, fut: Future) -> Outcome:
        job = jobs.load_job(jobs.CreateAdapterJob, fut.request_payload)
        backend = self.backend(job.base_model)
        backend.create_adapter(job.model_id, job.lora)
        outcome = Outcome("json", json_result({"model_id": job.model_id, "type": "create_model"}),
                          audit={"lora": job.lora.to_dict()},
                          apply=_set_run_status(job.model_id, "active"))
        return self._weights_changed(backend, outcome, job.model_id, fut.seq_id or 0)

    def _load_weights(self, fut: Future) -> Outcome:
        job = jobs.load_job(jobs.LoadAdapterJob, fut.request_payload)
        directory = self.checkpoint_root / job.storage_dir
        backend = self.backend(job.base_model)
        spec = backend.load_adapter(job.model_id, directory, job.with_optimizer)
        apply = None
        if job.creates_run:
            apply = _set_run_status(job.model_id, "active", lora=spec)
        result = {"model_id": job.model_id, "path": job.source_path, "type": "load_weights"}
        outcome = Outcome("json", json_result(result), apply=apply,
                          audit={"source": job.source_path, "optimizer": job.with_optimizer})
        return self._weights_changed(backend, outcome, job.model_id, fut.seq_id or 0)

    def _forward_backward(self, fut: Future) -> Outcome:
        call = wire.decode_forward_backward(fut.request_payload)
        backend = self.training_backend(call.model_id)
        result = backend.forward_backward(call.model_id, call.data, call.loss_fn,
                                          call.loss_config, call.forward_only)
        return self._trained(fut, call, result)

    def _training_round(self, first: Future) -> None:
        """Run `first` and the next forward_backward of other runs on its base model as
        one pass (the backend's `forward_backward_many`); each job is committed, or
        fails, on its own."""
        batching = any(b.batch_across_runs for b in self._backends.values())
        others = self._claim_training(first) if batching else []
        if not others:
            self._run(first)
            return
        started = time.perf_counter()
        ready: list[tuple[Future, wire.ForwardBackwardCall]] = []
        backend = None
        for fut in (first, *others):
            try:
                call = wire.decode_forward_backward(fut.request_payload)
                backend = self.training_backend(call.model_id)
                ready.append((fut, call))
            except Exception as exc:
                self._fail(fut, exc)
        if backend is None:
            return
        try:
            results = backend.forward_backward_many([
                TrainingPass(c.model_id, c.data, c.loss_fn, c.loss_config, c.forward_only)
                for _, c in ready])
        except Exception as exc:  # a failed pass fails every job in it
            for fut, _ in ready:
                self._fail(fut, exc)
            return
        for (fut, call), result in zip(ready, results, strict=True):
            if isinstance(result, UserInputError):
                self._fail(fut, result)
                continue
            outcome = self._trained(fut, call, result)
            outcome.audit["runs_in_pass"] = len(ready)
            self._commit(fut, outcome, started)
            self._notify(fut)

    def _fail(self, fut: Future, exc: Exception) -> None:
        """Resolve a job that raised: a user error in its words, anything else as ours."""
        if isinstance(exc, UserInputError):
            self._finish_failed(fut, str(exc), "user")
        else:
            logger.error("job %s (%s) failed", fut.request_id, fut.kind, exc_info=exc)
            self._finish_failed(fut, f"internal error while running {fut.kind}: "
                                f"{type(exc).__name__}", "server")
        self._notify(fut)

    def _trained(self, fut: Future, call: wire.ForwardBackwardCall,
                 result: ForwardBackwardResult) -> Outcome:
        """The outcome of a forward_backward that ran: its result, audit and durable log."""
        tokens = int(sum(len(d.tokens) for d in call.data))
        audit = {
            "loss_fn": call.loss_fn,
            "forward_only": call.forward_only,
            "datums": len(call.data),
            "tokens": tokens,
            "content_sha256": hashlib.sha256(fut.request_payload).hexdigest(),
            "loss_sum": result.metrics.get("loss:sum"),
        }
        outcome = Outcome("proto", wire.encode_forward_backward_result(result), audit=audit,
                          used={"training_tokens": tokens})
        if call.forward_only or call.model_id not in self._in_memory:
            return outcome  # nothing changed, or a run that keeps no durable state
        return self._logged(outcome, fut, call.model_id)

    def _optim_step(self, fut: Future) -> Outcome:
        job = jobs.load_job(jobs.OptimStepJob, fut.request_payload)
        backend = self.training_backend(job.model_id)
        metrics = backend.optim_step(job.model_id, job.step)
        outcome = Outcome("json", json_result({"metrics": metrics, "type": "optim_step"}),
                          audit={"adam": job.step.__dict__})
        held = self._in_memory.get(job.model_id)
        if held is None:  # a run that keeps no durable state
            return outcome
        if run_state.logged_steps(self.checkpoint_root, job.model_id, held) + 1 \
                >= self.snapshot_every:
            return self._weights_changed(backend, outcome, job.model_id, fut.seq_id or 0)
        return self._logged(outcome, fut, job.model_id)

    def _save(self, fut: Future) -> Outcome:
        job = jobs.load_job(jobs.SaveAdapterJob, fut.request_payload)
        backend = self.training_backend(job.model_id)
        size = backend.save_adapter(job.model_id, self.checkpoint_root / job.storage_dir,
                                    job.with_optimizer)
        if job.sampler_id:
            result = {"sampling_session_id": job.sampler_id, "type": "save_weights_for_sampler"}
        else:
            result = {"path": job.tinker_path, "type": fut.kind}
        return Outcome("json", json_result(result),
                       audit={"path": job.tinker_path, "bytes": size},
                       apply=_record_checkpoint(job, fut.principal_id, size,
                                                backend.info.name))

    # ------------------------------------------------------------------ sampling

    def _sampling_round(self, first: Future) -> None:
        """Decode `first` together with the sampling requests of its base model that are
        queued or arrive while it runs (continuous batching, engine.decoding); each
        request finishes, is screened and is committed on its own as soon as it is done."""
        base_model = jobs.load_job(jobs.SampleJob, first.request_payload).base_model
        try:
            decoder = self.backend(base_model).batch_decoder()
        except Exception as exc:
            self._fail(first, exc)
            return
        running: dict[str, _Sampling] = {}
        self._admit(decoder, [first], running)
        closes = time.monotonic() + SAMPLING_ROUND_SECONDS
        steps = 0
        while not decoder.empty:
            if (steps % ADMIT_EVERY_STEPS == 0 and decoder.can_join
                    and time.monotonic() < closes and decoder.rows < SAMPLE_ROWS):
                more = self._claim_samples(base_model, SAMPLE_ROWS - decoder.rows)
                self._admit(decoder, more, running)
            steps += 1
            try:
                finished = decoder.step()
            except Exception as exc:  # a failed pass fails every request in it
                for sampling in running.values():
                    self._fail(sampling.fut, exc)
                return
            for key, result in finished:
                self._finish_sample(running.pop(str(key)), result)

    def _admit(self, decoder: SamplingBatch, futs: list[Future],
               running: dict[str, _Sampling]) -> None:
        """Add claimed sampling requests to the round; one that cannot run fails alone."""
        for fut in futs:
            try:
                job = jobs.load_job(jobs.SampleJob, fut.request_payload)
                backend = self.backend(job.base_model)
                call = wire.parse_sample_request(job.request)  # the backend guards the ids
                keep = frozenset(s.adapter for s in running.values() if s.adapter)
                adapter = self._sampler_adapter(backend, job.adapter_dir, keep)
                decoder.add(fut.request_id, adapter, call.spec)
            except Exception as exc:
                self._fail(fut, exc)
            else:
                running[fut.request_id] = _Sampling(fut, job, call.spec, adapter, backend,
                                                    time.perf_counter())

    def _finish_sample(self, sampling: _Sampling, result: SampleResult) -> None:
        """Screen a finished request's samples and commit its result."""
        spec = sampling.spec
        # What the caller can observe must not depend on withheld text: a withheld sample
        # is charged its max_tokens (its real length would say where it stopped), and
        # scored prompt tokens (prompt logprobs or their top-k) are charged as sampled.
        lengths = [len(s.tokens) for s in result.sequences]
        screened = self._screen_outputs(sampling.backend, result)
        withheld = {int(i) for i in screened.get("withheld", {})}
        used = {"prefill_tokens": len(spec.prompt),
                "sampled_tokens": sum(spec.max_tokens if i in withheld else n
                                      for i, n in enumerate(lengths))
                + spec.scored_prompt_tokens}
        audit = {"samples": spec.num_samples, **used,
                 "scored_prompt_tokens": spec.scored_prompt_tokens,
                 "adapter": sampling.job.adapter_dir, **screened}
        outcome = Outcome("proto", wire.encode_sample_result(result), audit=audit, used=used)
        outcome.audit["seconds"] = round(time.perf_counter() - sampling.started, 4)
        self._finish_done(sampling.fut, outcome)
        self._notify(sampling.fut)

    def _screen_outputs(self, backend: Backend, result: SampleResult) -> dict[str, Any]:
        """Withhold the sequences the output screen flags: each is replaced by
        WITHHELD_NOTICE (its logprobs and top-k dropped, and the prompt's top-k, whose last
        row predicts the withheld text's first token) and counted in the audit row, with
        the categories, scores and a hash of what was withheld."""
        if self.output_screen is None or not result.sequences:
            return {}
        tok = fast_tokenizer(backend.info.tokenizer_dir)
        texts = [tok.decode(s.tokens) for s in result.sequences]
        withheld: dict[str, Any] = {}
        notice = tok.encode(WITHHELD_NOTICE, add_special_tokens=False).ids
        for i, (text, (flagged, evidence)) in enumerate(
                zip(texts, self.output_screen(texts), strict=True)):
            if not flagged:
                continue
            result.sequences[i] = SampledSequence(tokens=notice, logprobs=[0.0] * len(notice),
                                                  stopped=True, topk=None)
            withheld[str(i)] = {"categories": flagged, "evidence": evidence,
                                "sha256": hashlib.sha256(text.encode()).hexdigest()}
        if withheld:  # the prompt's top-k holds the model's first predicted token
            result.topk_prompt_logprobs = None
        return {"screened_outputs": len(texts), "withheld": withheld}

    def _sampler_adapter(self, backend: Backend, adapter_dir: str | None,
                         in_use: frozenset[str] = frozenset()) -> str | None:
        """Sampler weights are immutable snapshots: load each once, keep a few (and every
        one a running request decodes with)."""
        if adapter_dir is None:
            return None
        key = f"sampler::{adapter_dir}"
        if key in self._sampler_adapters and backend.has_adapter(key):
            self._sampler_adapters.move_to_end(key)
            return key
        backend.load_adapter(key, self.checkpoint_root / adapter_dir, with_optimizer=False)
        self._sampler_adapters[key] = adapter_dir
        spare = [k for k in self._sampler_adapters if k not in in_use and k != key]
        for old in spare[:max(0, len(self._sampler_adapters) - SAMPLER_ADAPTER_CACHE)]:
            del self._sampler_adapters[old]
            backend.drop_adapter(old)
        return key


@dataclass
class _Sampling:
    """A sampling request in a round: its future, job, spec, adapter and start time."""

    fut: Future
    job: jobs.SampleJob
    spec: SampleSpec
    adapter: str | None
    backend: Backend
    started: float


def _samples_asked(job: jobs.SampleJob) -> int:
    """How many samples a queued request asks for (1 when it is malformed: it fails when
    it is admitted)."""
    try:
        return wire.parse_sample_request(job.request).spec.num_samples
    except UserInputError:
        return 1


def _next_of_its_run() -> ColumnElement[bool]:
    """The claim filter of run ordering: no other future of the same run is running or
    pending with a lower seq_id (futures of no run always pass)."""
    other = aliased(Future)
    return ~(select(other.request_id)
             .where(other.model_id == Future.model_id,
                    or_(other.status == "running",
                        and_(other.status == "pending", other.seq_id < Future.seq_id)))
             .exists())


def _set_run_status(model_id: str, status: str, lora: Any = None) -> Callable[[Session], None]:
    def apply(session: Session) -> None:
        values: dict[str, Any] = {"status": status}
        if lora is not None:
            values.update(lora_rank=lora.rank, lora_config=json.dumps(lora.to_dict()))
        session.execute(update(TrainingRun).where(TrainingRun.id == model_id).values(**values))

    return apply


def _record_durable(model_id: str, state: DurableState) -> Callable[[Session], None]:
    def apply(session: Session) -> None:
        session.execute(update(TrainingRun).where(TrainingRun.id == model_id).values(
            durable_weights_seq=state.weights_seq, durable_log_seq=state.log_seq))

    return apply


def _then(first: Callable[[Session], None] | None,
          second: Callable[[Session], None]) -> Callable[[Session], None]:
    def apply(session: Session) -> None:
        if first is not None:
            first(session)
        second(session)

    return apply


def _record_checkpoint(
    job: jobs.SaveAdapterJob, principal_id: str, size: int, base_model: str
) -> Callable[[Session], None]:
    def apply(session: Session) -> None:
        existing = session.scalars(select(Checkpoint).where(
            Checkpoint.training_run_id == job.model_id, Checkpoint.kind == job.kind,
            Checkpoint.name == job.name)).first()
        if existing is not None:  # overwrite=True replaced the files in place
            session.delete(existing)
            session.flush()
        expires = None
        if job.ttl_seconds:
            expires = utcnow() + dt.timedelta(seconds=job.ttl_seconds)
        run = session.get(TrainingRun, job.model_id)
        ckpt = Checkpoint(
            training_run_id=job.model_id, principal_id=principal_id, kind=job.kind,
            name=job.name, tinker_path=job.tinker_path, storage_dir=job.storage_dir,
            size_bytes=size, has_optimizer=job.with_optimizer,
            user_metadata=json.dumps(job.user_metadata), expires_at=expires,
            parent_checkpoint_id=run.parent_checkpoint_id if run is not None else None,
        )
        session.add(ckpt)
        session.flush()
        if job.sampler_id and job.session_id:
            session.add(Sampler(id=job.sampler_id, session_id=job.session_id,
                                principal_id=principal_id, base_model=base_model,
                                model_path=job.tinker_path, checkpoint_id=ckpt.id,
                                parent_run_id=job.model_id))

    return apply
