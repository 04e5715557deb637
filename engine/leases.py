"""Worker leases: which worker runs each training run's jobs, and noticing dead workers.

Several workers may drain one queue (one per GPU node, on one PostgreSQL). A training run's
adapter lives in the memory of the worker that ran its last job, so its jobs should go
there: a worker that claims a run's job takes the run's lease, renews the leases of all the
runs it holds with its heartbeat (every third of `lease_seconds`, from a thread of its own
so that a long job does not stop it), and other workers do not claim a run's jobs while
its lease lasts. A worker whose heartbeat has stopped for `lease_seconds` is dead: its
leases have expired, so any worker may take its runs (restoring them from durable state,
engine.run_state), and the futures it was running are put back in the queue by the first
live worker that notices.

New runs are spread over the live workers: a worker does not take the first job of a run
it holds no lease on while another live worker (heartbeat within `lease_seconds`) is
running fewer runs (distinct runs it claimed a job of in the last ACTIVE_SECONDS), unless
the job has waited `lease_seconds` already (a busy peer never holds a new run back for
longer). Jobs that belong to no training run (sampling a saved checkpoint, release
evaluations) go to whichever worker claims them first.

Must not import fastapi, gateway or policy.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Sequence

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, true, update
from sqlalchemy.orm import Session

from audit.models import Future, TrainingRun, WorkerHeartbeat

LEASE_SECONDS = 30.0
ACTIVE_SECONDS = 120.0  # a run counts toward its worker's load this long after a job


def beat(session: Session, worker_id: str, lease_seconds: float, now: dt.datetime) -> None:
    """Record that `worker_id` is alive and extend the leases it holds."""
    row = session.get(WorkerHeartbeat, worker_id)
    if row is None:
        session.add(WorkerHeartbeat(worker_id=worker_id, started_at=now, heartbeat_at=now))
    else:
        row.heartbeat_at = now
    session.execute(update(TrainingRun).where(TrainingRun.lease_worker_id == worker_id)
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))


def claimable_by(worker_id: str, now: dt.datetime, *, takes_new_runs: bool = True,
                 lease_seconds: float = LEASE_SECONDS) -> ColumnElement[bool]:
    """The claim filter: the future belongs to no run, or its run is not leased to another
    worker whose lease still lasts; without `takes_new_runs`, a run's job only when the
    run is leased to this worker or the job has waited `lease_seconds`."""
    def leased(holder: ColumnElement[bool]) -> ColumnElement[bool]:
        return exists(select(TrainingRun.id).where(
            TrainingRun.id == Future.model_id, holder, TrainingRun.lease_expires_at > now))

    held_elsewhere = leased(and_(TrainingRun.lease_worker_id.is_not(None),
                                 TrainingRun.lease_worker_id != worker_id))
    held_here = leased(TrainingRun.lease_worker_id == worker_id)
    waited = Future.created_at <= now - dt.timedelta(seconds=lease_seconds)
    new_run_ok = true() if takes_new_runs else or_(held_here, waited)
    return or_(Future.model_id.is_(None), and_(~held_elsewhere, new_run_ok))


def takes_new_runs(session: Session, worker_id: str, lease_seconds: float,
                   now: dt.datetime) -> bool:
    """Whether `worker_id` may take a run it holds no lease on: no other live worker runs
    fewer runs than it does."""
    live = session.scalars(select(WorkerHeartbeat.worker_id).where(
        WorkerHeartbeat.worker_id != worker_id,
        WorkerHeartbeat.heartbeat_at >= now - dt.timedelta(seconds=lease_seconds))).all()
    if not live:
        return True
    since = now - dt.timedelta(seconds=ACTIVE_SECONDS)
    load = dict(session.execute(
        select(Future.worker_id, func.count(func.distinct(Future.model_id)))
        .where(Future.claimed_at >= since, Future.model_id.is_not(None),
               Future.worker_id.in_([worker_id, *live]))
        .group_by(Future.worker_id)).tuples().all())
    return load.get(worker_id, 0) <= min(load.get(w, 0) for w in live)


def take(session: Session, run_id: str, worker_id: str, lease_seconds: float,
         now: dt.datetime) -> None:
    """Lease the run to `worker_id` (it just claimed one of the run's jobs)."""
    session.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(
        lease_worker_id=worker_id,
        lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))


def orphaned_futures(session: Session, worker_id: str, lease_seconds: float,
                     now: dt.datetime) -> Sequence[Future]:
    """Futures still `running` under a worker (not this one) whose heartbeat stopped
    `lease_seconds` ago, locked (others that look at the same time skip them)."""
    cutoff = now - dt.timedelta(seconds=lease_seconds)
    dead = exists(select(WorkerHeartbeat.worker_id).where(
        WorkerHeartbeat.worker_id == Future.worker_id,
        WorkerHeartbeat.heartbeat_at < cutoff))
    stmt = (select(Future)
            .where(and_(Future.status == "running", Future.worker_id != worker_id, dead))
            .order_by(Future.created_at))
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return session.scalars(stmt).all()


def heartbeat_thread(beat_once: Callable[[], None], lease_seconds: float,
                     stop: threading.Event) -> threading.Thread:
    """A daemon thread calling `beat_once` every third of the lease until `stop`."""
    def loop() -> None:
        while not stop.wait(lease_seconds / 3):
            beat_once()

    thread = threading.Thread(target=loop, name="loragate-worker-heartbeat", daemon=True)
    thread.start()
    return thread
