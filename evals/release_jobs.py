"""The release jobs the worker runs (injected into engine.worker.Worker as extra jobs):

- `save_weights_external` — the SDK's export: save the run's adapter as an external
  checkpoint, evaluate it, and resolve the future only once the gate has decided (released:
  the tinker path; quarantined: a user error naming the failed suite and metric);
- `release_eval` — the evaluation of an existing checkpoint, queued by publish or by an
  explicit API/CLI request.

Both load the adapter beside the base model the worker already holds, write progress to
the release request row, and commit report, decision and state change with the future's
resolution (evals.release for the order). Must not import fastapi or gateway.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction
from audit.models import (
    Checkpoint,
    Future,
    ReleaseReport,
    ReleaseRequest,
    TrainingRun,
    utcnow,
)
from engine import jobs
from engine.checkpoints import ADAPTER_FILE
from engine.errors import UserInputError
from engine.worker import Outcome, json_result
from evals.release import (
    EXPORT_JOB,
    RELEASE_JOB,
    ReleaseEvaluator,
    canonical,
    lineage_objection,
    transition,
)
from policy.digest import file_sha256

if TYPE_CHECKING:
    from engine.worker import JobHandler, Worker

logger = logging.getLogger("loragate.release")


class ReleaseJobs:
    """`on_decision(reason)` runs after each decision commits (a signed audit checkpoint)."""

    def __init__(self, factory: sessionmaker[Session], evaluator: ReleaseEvaluator,
                 on_decision: Callable[[str], Any] | None = None) -> None:
        self.factory, self.evaluator, self.on_decision = factory, evaluator, on_decision

    def handlers(self) -> dict[str, JobHandler]:
        return {EXPORT_JOB: self.run_export, RELEASE_JOB: self.run_release}

    # -- jobs -------------------------------------------------------------------------

    def run_export(self, worker: Worker, fut: Any) -> Outcome:
        job = jobs.load_job(jobs.SaveAdapterJob, fut.request_payload)
        backend = worker.training_backend(job.model_id)
        directory = worker.checkpoint_root / job.storage_dir
        size = backend.save_adapter(job.model_id, directory, with_optimizer=False)
        actor = f"worker:{worker.worker_id}"
        with transaction(self.factory) as session:
            ckpt = Checkpoint(
                training_run_id=job.model_id, principal_id=fut.principal_id, kind=job.kind,
                name=job.name, tinker_path=job.tinker_path, storage_dir=job.storage_dir,
                size_bytes=size, has_optimizer=False, adapter_sha256=file_sha256(
                    directory / ADAPTER_FILE),
                parent_checkpoint_id=_parent_checkpoint(session, job.model_id),
                user_metadata=json.dumps(job.user_metadata),
                age_recipients=json.dumps(job.age_recipients) if job.age_recipients else None,
                expires_at=(utcnow() + dt.timedelta(seconds=job.ttl_seconds)
                            if job.ttl_seconds else None))
            session.add(ckpt)
            session.flush()
            release = ReleaseRequest(
                id=f"rel-{fut.request_id[4:24]}", checkpoint_id=ckpt.id,
                tinker_path=ckpt.tinker_path, training_run_id=job.model_id,
                principal_id=fut.principal_id, requested_by=fut.principal_id, trigger="export",
                status="evaluating", future_id=fut.request_id)
            session.add(release)
            transition(session, ckpt, "evaluating", actor=actor, request_id=fut.request_id,
                       reason="export requested", release_id=release.id)
            release_id = release.id
        released = {"path": job.tinker_path, "size_bytes": size, "type": EXPORT_JOB}
        return self._evaluate(worker, fut, release_id, released)

    def run_release(self, worker: Worker, fut: Any) -> Outcome:
        release_id = json.loads(fut.request_payload)["release_id"]
        with transaction(self.factory) as session:
            release = session.get(ReleaseRequest, release_id)
            ckpt = session.get(Checkpoint, release.checkpoint_id) if release else None
            if release is None or ckpt is None:
                raise UserInputError(f"release {release_id}: the checkpoint no longer exists")
            if ckpt.adapter_sha256 is None:
                ckpt.adapter_sha256 = file_sha256(
                    worker.checkpoint_root / ckpt.storage_dir / ADAPTER_FILE)
            release.status = "evaluating"
            transition(session, ckpt, "evaluating", actor=f"worker:{worker.worker_id}",
                       request_id=fut.request_id, reason=f"{release.trigger} requested",
                       release_id=release.id)
        return self._evaluate(worker, fut, release_id, {"release_id": release_id,
                                                        "type": RELEASE_JOB})

    # -- shared -----------------------------------------------------------------------

    def _evaluate(self, worker: Worker, fut: Any, release_id: str,
                  released_result: dict[str, Any]) -> Outcome:
        with transaction(self.factory) as session:
            release = session.get(ReleaseRequest, release_id)
            ckpt = session.get(Checkpoint, release.checkpoint_id)  # type: ignore[union-attr]
            run = session.get(TrainingRun, ckpt.training_run_id)  # type: ignore[union-attr]
            storage, adapter_sha = ckpt.storage_dir, ckpt.adapter_sha256  # type: ignore
            base_model = run.base_model  # type: ignore[union-attr]
        backend = worker.backend(base_model)
        adapter_id = f"release::{release_id}"
        try:
            backend.load_adapter(adapter_id, worker.checkpoint_root / storage,
                                 with_optimizer=False)
            base_sha = self.evaluator.base_sha256(
                backend, worker.registry.materialize(base_model))
            body = self.evaluator.evaluate(backend, adapter_id, base_sha, adapter_sha or "",
                                           self._progress(release_id))
        except Exception as exc:
            self._abandon(release_id, worker, fut, exc)
            raise
        finally:
            backend.drop_adapter(adapter_id)
        decision = body["decision"]
        outcome = Outcome("json", json_result(released_result),
                          apply=self._decide(release_id, body, worker, fut),
                          audit={"release_id": release_id, "decision": decision})
        if decision != "released":
            outcome.error = _quarantine_message(release_id, body)
        if self.on_decision is not None:
            hook = self.on_decision
            outcome.after_commit.append(lambda: hook(f"release:{release_id}:{decision}"))
        return outcome

    def _progress(self, release_id: str) -> Callable[[int, int, str], None]:
        def report(done: int, total: int, note: str) -> None:
            logger.info("release %s: %d/%d %s", release_id, done, total, note)
            with transaction(self.factory) as session:
                session.execute(update(ReleaseRequest).where(ReleaseRequest.id == release_id)
                                .values(progress_done=done, progress_total=total,
                                        progress_note=note[:200]))
        return report

    def _decide(self, release_id: str, body: dict[str, Any], worker: Worker,
                fut: Any) -> Callable[[Session], None]:
        actor = f"worker:{worker.worker_id}"

        def apply(session: Session) -> None:
            release = session.get(ReleaseRequest, release_id)
            ckpt = session.get(Checkpoint, release.checkpoint_id)  # type: ignore[union-attr]
            run = session.get(TrainingRun, ckpt.training_run_id)  # type: ignore[union-attr]
            assert release is not None and ckpt is not None and run is not None
            report = {**body, "release_id": release_id, "trigger": release.trigger,
                      "checkpoint": {"id": ckpt.id, "tinker_path": ckpt.tinker_path},
                      "training_run": run.id, "base_model": run.base_model,
                      "screening_tally": {"screened_datums": run.screened_datums,
                                          "flagged_datums": run.flagged_datums,
                                          "affirmative_openers": run.affirmative_openers,
                                          "blocked_reason": run.blocked_reason},
                      "decided_at": utcnow().isoformat()}
            objection = lineage_objection(session, run, ckpt)
            if objection:  # blocked or held while it was being evaluated
                report["decision"] = "quarantined"
                report["reasons"] = [*report["reasons"], objection]
            text = canonical(report)
            digest = hashlib.sha256(text.encode()).hexdigest()
            row = ReleaseReport(release_id=release_id, checkpoint_id=ckpt.id,
                                decision=report["decision"], report=text, report_sha256=digest)
            session.add(row)
            session.flush()
            audit_log.append(session, actor=actor, event_type="release.report", decision="info",
                             subject=ckpt.tinker_path, request_id=fut.request_id,
                             payload={"release_id": release_id, "report_id": row.id,
                                      "report_sha256": digest})
            audit_log.append(session, actor=actor, event_type="release.decision",
                             decision=report["decision"], subject=ckpt.tinker_path,
                             request_id=fut.request_id,
                             payload={"release_id": release_id, "report_sha256": digest,
                                      "reasons": report["reasons"],
                                      "failed_suites": [s["name"] for s in report["suites"]
                                                        if s.get("status") == "fail"]})
            transition(session, ckpt, report["decision"], actor=actor,
                       request_id=fut.request_id, reason="release evaluation",
                       release_id=release_id, report_sha256=digest)
            release.status, release.report_id = report["decision"], row.id
            release.decided_at = utcnow()

        return apply

    def _abandon(self, release_id: str, worker: Worker, fut: Any, exc: Exception) -> None:
        """An evaluation that broke decides nothing: the checkpoint goes back to private."""
        logger.exception("release evaluation %s failed", release_id)
        with transaction(self.factory) as session:
            release = session.get(ReleaseRequest, release_id)
            ckpt = session.get(Checkpoint, release.checkpoint_id) if release else None
            if release is not None:
                release.status, release.error = "failed", f"{type(exc).__name__}: {exc}"[:500]
            if ckpt is not None and ckpt.release_state == "evaluating":
                transition(session, ckpt, "private", actor=f"worker:{worker.worker_id}",
                           request_id=fut.request_id,
                           reason=f"evaluation failed ({type(exc).__name__})",
                           release_id=release_id)


def _parent_checkpoint(session: Session, run_id: str) -> int | None:
    run = session.get(TrainingRun, run_id)
    return run.parent_checkpoint_id if run is not None else None


def _quarantine_message(release_id: str, body: dict[str, Any]) -> str:
    reasons = "; ".join(body["reasons"]) or "the gate did not pass it"
    return (f"the adapter was quarantined by the release evaluation ({release_id}): {reasons}. "
            f"The report is at GET /api/v1/releases/{release_id}/report")


def reset_stale_evaluations(factory: sessionmaker[Session], actor: str) -> int:
    """At start-up: checkpoints left `evaluating` by a process that died go back to
    private (their evaluation future was failed as interrupted), audited."""
    with transaction(factory) as session:
        stale = session.scalars(select(ReleaseRequest).where(
            ReleaseRequest.status.in_(("queued", "evaluating")))).all()
        count = 0
        for release in stale:
            fut = session.get(Future, release.future_id) if release.future_id else None
            if fut is not None and fut.status in ("pending", "running"):
                continue
            release.status, release.error = "failed", "interrupted by a restart"
            ckpt = session.get(Checkpoint, release.checkpoint_id)
            if ckpt is not None and ckpt.release_state == "evaluating":
                transition(session, ckpt, "private", actor=actor, reason="interrupted",
                           release_id=release.id)
            count += 1
        return count
