"""Deployment-wide metrics, read from the database each time /metrics is scraped: the
queue per job kind, recent job times, tokens, screening refusals and blocked runs, and
release decisions.

Whatever process did the work (the API's embedded worker or any `loragate worker` on the
same database), it is in these tables, so one scrape of one API process shows the whole
deployment; every API process on the database reports the same values. Each family is one
aggregate query on the read-only engine: the queue and recent jobs go through the futures
(status, created_at) index, decisions are counts of audit rows by the event_type index,
tokens a sum over usage_counters (a row per key, day and run). Must not write anything
and must not keep in-process counts (gateway.metrics and the layers' own metrics modules
do).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import case, extract, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from audit.db import transaction
from audit.models import AuditEntry, Future, UsageCounter, utcnow
from engine.jobs import ENGINE_JOB_KINDS
from evals.release import EXPORT_JOB, RELEASE_JOB

logger = logging.getLogger("loragate.metrics")

# Every kind the gateway queues, reported even when none is queued (a zero, not a gap).
JOB_KINDS = (*ENGINE_JOB_KINDS, EXPORT_JOB, RELEASE_JOB)
QUEUED = ("pending", "running")
FINISHED = ("done", "failed")
# Job times are over the jobs queued this recently that have finished.
RECENT_JOBS_SECONDS = 900
# Audit events counted, and the release decision each stands for ((decision, decided_by)).
SCREENING_REFUSED, RUN_BLOCKED = "screening.refused", "screening.run_blocked"
RELEASE_DECISION, OVERRIDE_APPROVED = "release.decision", "release.override_approved"
RELEASE_OUTCOMES = (("released", "gate"), ("quarantined", "gate"), ("released", "override"))


class DeploymentCollector:
    """A prometheus_client collector whose values are queries, run at scrape time."""

    def __init__(self, read_factory: sessionmaker[Session],
                 recent_seconds: float = RECENT_JOBS_SECONDS) -> None:
        self.read_factory = read_factory
        self.recent_seconds = recent_seconds

    def collect(self) -> Iterable[Metric]:
        """Every family, or none when the database cannot be read (then `up` says 0)."""
        since = utcnow() - dt.timedelta(seconds=self.recent_seconds)
        try:
            with transaction(self.read_factory) as session:
                families = [*queue_depth(session), *recent_jobs(session, since,
                                                               self.recent_seconds),
                            *tokens(session), *audited_decisions(session)]
        except SQLAlchemyError:
            logger.exception("reading the deployment metrics from the database failed")
            families = []
        return [*families, _up(bool(families))]


def _up(ok: bool) -> Metric:
    family = GaugeMetricFamily("loragate_deployment_metrics_up",
                               "1 when this scrape read the deployment-wide metrics from the "
                               "database, 0 when the database could not be read")
    family.add_metric([], 1 if ok else 0)
    return family


def queue_depth(session: Session) -> list[Metric]:
    rows = session.execute(select(Future.kind, Future.status, func.count())
                           .where(Future.status.in_(QUEUED))
                           .group_by(Future.kind, Future.status)).all()
    depth = {(kind, status): 0 for kind in JOB_KINDS for status in QUEUED}
    depth.update({(kind, status): n for kind, status, n in rows})
    family = GaugeMetricFamily(
        "loragate_queue_depth", "Futures waiting for a worker (pending) or being run "
        "(running), per job kind, read from the database at scrape time (all workers)",
        labels=["kind", "status"])
    for (kind, status), n in sorted(depth.items()):
        family.add_metric([kind, status], n)
    return [family]


def _seconds_between(session: Session, start: Any, end: Any) -> Any:
    """SQL for `end - start` in seconds (NULL when either is NULL)."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return extract("epoch", end - start)


def recent_jobs(session: Session, since: dt.datetime, window: float) -> list[Metric]:
    """Jobs queued since `since` that have finished: how many, and their mean wait (queued
    → claimed) and run (claimed → finished) times per kind."""
    run = _seconds_between(session, Future.claimed_at, Future.finished_at)
    wait = _seconds_between(session, Future.created_at, Future.claimed_at)
    rows = session.execute(
        select(Future.kind, Future.status, func.count(), func.count(run), func.sum(run),
               func.sum(wait))
        .where(Future.status.in_(FINISHED), Future.created_at >= since)
        .group_by(Future.kind, Future.status)).all()
    finished = {(kind, status): 0 for kind in JOB_KINDS for status in FINISHED}
    timed: dict[str, list[float]] = {}  # kind -> [claimed jobs, run seconds, wait seconds]
    for kind, status, n, claimed, run_sum, wait_sum in rows:
        finished[(kind, status)] = n
        sums = timed.setdefault(kind, [0, 0.0, 0.0])
        sums[0] += claimed
        sums[1] += float(run_sum or 0.0)
        sums[2] += float(wait_sum or 0.0)
    return [_finished_family(finished, window), *_mean_families(timed, window)]


def _finished_family(finished: dict[tuple[str, str], int], window: float) -> Metric:
    family = GaugeMetricFamily(
        "loragate_jobs_recent_finished", f"Jobs queued in the last {window:.0f} s that have "
        "finished, per kind and outcome (done or failed), read from the database at scrape "
        "time", labels=["kind", "status"])
    for (kind, status), n in sorted(finished.items()):
        family.add_metric([kind, status], n)
    return family


def _mean_families(timed: dict[str, list[float]], window: float) -> list[Metric]:
    """Mean run and wait seconds per kind; a kind with no claimed recent job has none."""
    run = GaugeMetricFamily(
        "loragate_job_run_seconds_recent_mean", "Mean seconds from a worker claiming a job "
        f"to its finishing, over the jobs queued in the last {window:.0f} s that have "
        "finished (done or failed), per kind", labels=["kind"])
    wait = GaugeMetricFamily(
        "loragate_job_wait_seconds_recent_mean", "Mean seconds a job waited in the queue "
        f"before a worker claimed it, over the jobs queued in the last {window:.0f} s that "
        "have finished, per kind", labels=["kind"])
    for kind, (claimed, run_sum, wait_sum) in sorted(timed.items()):
        if claimed:
            run.add_metric([kind], run_sum / claimed)
            wait.add_metric([kind], wait_sum / claimed)
    return [run, wait]


def tokens(session: Session) -> list[Metric]:
    """Settled token usage of every key (a screening dry run's tokens are metered as
    training tokens of no run)."""
    c = UsageCounter
    dry_run = c.training_run_id == ""
    row = session.execute(select(
        func.coalesce(func.sum(case((dry_run, 0), else_=c.training_tokens)), 0),
        func.coalesce(func.sum(case((dry_run, c.training_tokens), else_=0)), 0),
        func.coalesce(func.sum(c.sampled_tokens), 0),
        func.coalesce(func.sum(c.prefill_tokens), 0))).one()
    family = CounterMetricFamily(
        "loragate_tokens", "Tokens used by every key, from usage_counters at scrape time, "
        "once their job finished: trained (datums of forward and forward_backward calls), "
        "screened_dry_run (examples of screening dry runs, metered as training), sampled "
        "(generated tokens) and sampling_prompt (prompt tokens of sampling calls)",
        labels=["kind"])
    for kind, n in zip(("trained", "screened_dry_run", "sampled", "sampling_prompt"), row,
                       strict=True):
        family.add_metric([kind], int(n))
    return [family]


def audited_decisions(session: Session) -> list[Metric]:
    """Screening refusals, runs blocked and release decisions, counted in the audit log
    (append-only, so these only grow)."""
    rows = session.execute(
        select(AuditEntry.event_type, AuditEntry.decision, func.count())
        .where(AuditEntry.event_type.in_((SCREENING_REFUSED, RUN_BLOCKED, RELEASE_DECISION,
                                          OVERRIDE_APPROVED)))
        .group_by(AuditEntry.event_type, AuditEntry.decision)).all()
    counts = {(event, decision): n for event, decision, n in rows}

    def total(event: str) -> int:
        return sum(n for (e, _), n in counts.items() if e == event)

    refused = CounterMetricFamily(
        "loragate_screening_refusals", "Requests refused by screening (training batches and "
        "sampling prompts; audit rows screening.refused), in the whole deployment")
    refused.add_metric([], total(SCREENING_REFUSED))
    blocked = CounterMetricFamily(
        "loragate_screening_blocked_runs", "Training runs blocked for good by their "
        "screening tally (audit rows screening.run_blocked), in the whole deployment")
    blocked.add_metric([], total(RUN_BLOCKED))
    return [refused, blocked, _release_family(counts)]


def _release_family(counts: dict[tuple[str, str], int]) -> Metric:
    family = CounterMetricFamily(
        "loragate_release_decisions", "Release decisions on checkpoints: the gate's "
        "(audit rows release.decision, released or quarantined) and two-person overrides "
        "that released a quarantined checkpoint (release.override_approved)",
        labels=["decision", "decided_by"])
    outcomes = dict.fromkeys(RELEASE_OUTCOMES, 0)
    for (event, decision), n in counts.items():
        if event == RELEASE_DECISION:
            outcomes[(decision, "gate")] = outcomes.get((decision, "gate"), 0) + n
        elif event == OVERRIDE_APPROVED:
            outcomes[("released", "override")] += n
    for (decision, decided_by), n in sorted(outcomes.items()):
        family.add_metric([decision, decided_by], n)
    return family
