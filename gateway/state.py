"""The application's lifespan state: built once at start-up, torn down at shutdown.

Owns wiring only — database engines, the model registry and its metadata, the
completion notifier, (embedded mode) the worker thread, the threads that write audit
checkpoints and purge expired future payloads, and the metrics registry with its optional
separate bind (gateway.metrics). Holds no request data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit import retention
from audit.db import make_engine, make_sessionmaker, transaction
from engine.registry import ModelRegistry
from engine.values import ModelInfo
from evals.release import load_suites
from gateway import downloads, metrics
from gateway.completions import Completions
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings
from migrations import upgrade_to_head
from policy.authz import Authorizer, seed_default_policy
from policy.release import ReleasePolicy, load_release_policy
from policy.scopes import Scopes, load_defaults
from policy.screening import metrics as screening_metrics
from policy.screening.screener import Screener
from policy.screening.screener import load_config as load_screening

logger = logging.getLogger("loragate.gateway")

AdmissionCheck = Callable[..., None]
EMBEDDED_RECHECK_SECONDS = 2.0


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    read_engine: Engine
    factory: sessionmaker[Session]
    read_factory: sessionmaker[Session]
    registry: ModelRegistry
    models: dict[str, ModelInfo]
    completions: Completions
    # Extra checks run by gateway.admission on every data-bearing request (screening,
    # quotas): each takes the AdmissionRequest and raises to refuse it.
    authorizer: Authorizer
    scope_defaults: Scopes
    checkpoints: Checkpointer
    screener: Screener
    release_policy: ReleasePolicy
    url_signing_secret: bytes  # signs the external-weights links (gateway.downloads)
    rate_limiter: RateLimiter
    metrics_registry: CollectorRegistry  # what /metrics serves (gateway.metrics)
    admission_checks: list[AdmissionCheck] = field(default_factory=list)
    worker: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _checkpoint_thread: threading.Thread | None = None
    _purge_thread: threading.Thread | None = None
    _metrics_server: WSGIServer | None = None  # the separate metrics bind, if any

    def model_info(self, name: str) -> ModelInfo | None:
        return self.models.get(name)

    @property
    def recheck_seconds(self) -> float:
        """How often a long-poll re-reads the database. An embedded worker wakes pollers
        directly, so the re-read is only a safety net; workers in other processes
        cannot, so then it is the settings' poll interval."""
        if self.worker is not None:
            return max(self.settings.poll_interval_seconds, EMBEDDED_RECHECK_SECONDS)
        return self.settings.poll_interval_seconds

    def wake_worker(self) -> None:
        if self.worker is not None:
            self.worker.wake.set()

    def close(self) -> None:
        self._stop.set()
        self.wake_worker()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._checkpoint_thread is not None:
            self._checkpoint_thread.join(timeout=60)
        if self._purge_thread is not None:
            self._purge_thread.join(timeout=60)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.engine.dispose()
        self.read_engine.dispose()


class Checkpointer:
    """Writes signed checkpoints of the audit head outside the database: on demand (every
    release decision) and on a timer while the log grows."""

    def __init__(self, factory: sessionmaker[Session], directory: Path,
                 signing_key: Ed25519PrivateKey | None) -> None:
        self.factory, self.directory, self.signing_key = factory, directory, signing_key
        self.last_seq = 0
        self._lock = threading.Lock()

    @property
    def signed(self) -> bool:
        return self.signing_key is not None

    def write(self, reason: str, *, only_if_grown: bool = False) -> Path | None:
        with self._lock, transaction(self.factory) as session:
            written = audit_log.write_checkpoint(
                session, self.directory, reason, self.signing_key,
                after_seq=self.last_seq if only_if_grown else 0)
        if written is None:
            return None
        ckpt, path = written
        self.last_seq = ckpt.seq
        logger.info("audit checkpoint", extra={"seq": ckpt.seq, "path": str(path),
                                               "reason": reason})
        return path

    def run_every(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            try:
                self.write("timer", only_if_grown=True)
            except Exception:  # a full disk must not kill the thread silently
                logger.exception("writing an audit checkpoint failed")
        self.write("shutdown", only_if_grown=True)


def build_state(settings: Settings) -> AppState:
    """Migrate the database, prepare base models, start the embedded worker."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.database
    upgrade_to_head(url)
    engine, read_engine = make_engine(url), make_engine(url, read_only=True)
    hmac_keys = settings.hmac_keys()
    factory, read_factory = make_sessionmaker(engine, hmac_keys), make_sessionmaker(read_engine)
    registry = ModelRegistry(settings.data_dir, settings.extra_models)
    models = {name: registry.info(name) for name in settings.base_models}
    with transaction(factory) as session:
        seed_default_policy(session)
    authorizer = Authorizer(read_factory)  # it only ever reads the rules
    authorizer.load()
    scope_defaults = load_defaults(settings.scopes_file)
    # A required screen that cannot load stops start-up here, naming the missing file.
    screener = Screener.build(load_screening(settings.screening_file), factory)
    # So does a release policy that is malformed or names a suite with too few items.
    release_policy = load_release_policy(settings.release_file)
    load_suites(release_policy)
    state = AppState(
        settings=settings, engine=engine, read_engine=read_engine, factory=factory,
        read_factory=read_factory, registry=registry, models=models,
        completions=Completions(), authorizer=authorizer, scope_defaults=scope_defaults,
        checkpoints=Checkpointer(read_factory, settings.checkpoint_dir, settings.signing_key()),
        screener=screener, release_policy=release_policy,
        url_signing_secret=downloads.signing_secret(settings.url_signing_key_path),
        rate_limiter=RateLimiter(settings.rate_limits),
        metrics_registry=metrics.scrape_registry(read_factory),
    )
    with transaction(state.factory) as session:
        audit_log.append(session, actor="system", event_type="gateway.start", decision="info",
                         payload={"base_models": sorted(models), "worker": settings.run_worker,
                                  "database": engine.dialect.name,
                                  "default_scopes_sha256": scope_defaults.digest(),
                                  "audit_hmac_key_id": hmac_keys.current if hmac_keys else None,
                                  "audit_checkpoints": str(settings.checkpoint_dir),
                                  "audit_checkpoints_signed": state.checkpoints.signed,
                                  "screening": screener.describe(),
                                  "release_policy_sha256": release_policy.sha256,
                                  "metrics_bind": settings.metrics_bind})
    if settings.metrics_bind:
        state._metrics_server = metrics.serve_metrics(settings.metrics_bind,
                                                      state.metrics_registry)
    if settings.run_worker:
        _start_worker(state)
    if settings.audit_checkpoint_seconds > 0:
        state._checkpoint_thread = threading.Thread(
            target=state.checkpoints.run_every, name="loragate-audit-checkpoints", daemon=True,
            args=(settings.audit_checkpoint_seconds, state._stop))
        state._checkpoint_thread.start()
    if settings.payload_purge_seconds > 0:
        state._purge_thread = threading.Thread(target=_purge_payloads, args=(state,),
                                               name="loragate-payload-purge", daemon=True)
        state._purge_thread.start()
    return state


def _purge_payloads(state: AppState) -> None:
    """Purge unretrieved payloads past the retention (audit.retention), now and then every
    `payload_purge_seconds` until shutdown."""
    settings = state.settings
    while True:
        try:
            retention.purge_all_expired(state.factory, actor="system",
                                        retention_days=settings.payload_retention_days)
        except Exception:  # a failed purge is retried at the next one
            logger.exception("purging expired future payloads failed")
        if state._stop.wait(settings.payload_purge_seconds):
            return


def release_evaluator(factory: sessionmaker[Session], release_policy: ReleasePolicy,
                      screener: Screener) -> Any:
    """The release evaluator, its generated replies judged by the screener's output
    thresholds (its version names what judges outputs: classifiers and output thresholds
    in force)."""
    from evals.release import ReleaseEvaluator

    def harm(texts: list[str]) -> list[list[str]]:
        return [flagged for flagged, _ in screener.flag_outputs(texts)]

    return ReleaseEvaluator(factory, release_policy, harm, lambda: harm_version(screener))


def harm_version(screener: Screener) -> str:
    """The version of the release gate's harm judge: a digest of what judges outputs."""
    judge = json.dumps(screener.output_judge(), sort_keys=True)
    return f"outputs@{hashlib.sha256(judge.encode()).hexdigest()[:16]}"


def make_worker(settings: Settings, factory: sessionmaker[Session], registry: ModelRegistry,
                screener: Screener, checkpoints: Checkpointer, release_policy: ReleasePolicy, *,
                worker_id: str, **options: Any) -> Any:
    """A worker wired with what the gateway owns: output screening and the release jobs
    (evaluations judged by the same screener; a signed audit checkpoint per decision)."""
    from engine.worker import Worker
    from evals.release_jobs import ReleaseJobs

    evaluator = release_evaluator(factory, release_policy, screener)
    jobs = ReleaseJobs(factory, evaluator, on_decision=checkpoints.write)
    return Worker(factory, registry, settings.checkpoint_root, worker_id=worker_id,
                  device=settings.device, batch_across_runs=settings.batch_across_runs,
                  output_screen=counted_output_screen(screener),
                  extra_jobs=jobs.handlers(), sweep_seconds=settings.checkpoint_sweep_seconds,
                  before_sweep_delete=cancel_overrides_of_expired, **options)


def counted_output_screen(screener: Screener) -> Callable[[list[str]], Any]:
    """The worker's output screen: the screener's, with each withheld output counted per
    category (policy.screening.metrics)."""
    def screen(texts: list[str]) -> list[tuple[list[str], dict[str, Any]]]:
        results = screener.flag_outputs(texts)
        screening_metrics.count_flags(screening_metrics.SAMPLED_OUTPUT,
                                      (flagged for flagged, _ in results))
        return results
    return screen


def cancel_overrides_of_expired(session: Session, ckpt: Any) -> None:
    """An expired checkpoint's pending release overrides are cancelled (audited) in the
    transaction that deletes it, as a user's delete does."""
    from evals.overrides import cancel_pending

    cancel_pending(session, ckpt, actor="sweeper",
                   reason="the checkpoint expired and was deleted")


def _start_worker(state: AppState) -> None:
    from evals.release_jobs import reset_stale_evaluations

    worker = make_worker(state.settings, state.factory, state.registry, state.screener,
                         state.checkpoints, state.release_policy, worker_id="embedded",
                         on_finished=state.completions.notify)
    worker.requeue_interrupted(any_worker=True)
    reset_stale_evaluations(state.factory, "worker:embedded")
    state.worker = worker
    state._thread = threading.Thread(target=worker.run_forever, args=(state._stop,),
                                     name="loragate-worker", daemon=True)
    state._thread.start()
