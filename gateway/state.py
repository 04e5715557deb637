"""The application's lifespan state: built once at start-up, torn down at shutdown.

Holds what the API process runs on — database engines, the model registry and its
metadata, the completion notifier, (embedded mode) the worker thread, the threads that
write audit checkpoints and purge expired future payloads, and the metrics registry with
its optional separate bind (gateway.metrics) — built from the parts gateway.composition
makes. Holds no request data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit import retention
from audit.db import transaction
from engine.registry import ModelRegistry
from engine.values import ModelInfo
from gateway import composition, downloads, metrics
from gateway.checkpointer import Checkpointer
from gateway.completions import Completions
from gateway.ratelimit import RateLimiter
from gateway.settings import Settings
from policy.authz import Authorizer, seed_default_policy
from policy.release import ReleasePolicy
from policy.scopes import Scopes, load_defaults
from policy.screening.screener import Screener

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


def build_state(settings: Settings) -> AppState:
    """Migrate the database, prepare base models, start the embedded worker."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    factory = composition.session_factory(settings)
    read_factory = composition.session_factory(settings, read_only=True, migrate=False)
    engine, read_engine = factory.kw["bind"], read_factory.kw["bind"]
    hmac_keys = settings.hmac_keys()
    registry = composition.model_registry(settings)
    models = {name: registry.info(name) for name in settings.base_models}
    with transaction(factory) as session:
        seed_default_policy(session)
    authorizer = Authorizer(read_factory)  # it only ever reads the rules
    authorizer.load()
    scope_defaults = load_defaults(settings.scopes_file)
    # A required screen that cannot load stops start-up here, naming the missing file.
    screener = composition.screener(settings, factory)
    # So does a release policy that is malformed or names a suite with too few items.
    release_policy = composition.release_policy(settings)
    state = AppState(
        settings=settings, engine=engine, read_engine=read_engine, factory=factory,
        read_factory=read_factory, registry=registry, models=models,
        completions=Completions(), authorizer=authorizer, scope_defaults=scope_defaults,
        checkpoints=composition.checkpointer(settings, read_factory),
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


def _start_worker(state: AppState) -> None:
    from evals.release_jobs import reset_stale_evaluations

    worker = composition.worker(state.settings, state.factory, worker_id="embedded",
                                registry=state.registry, screen=state.screener,
                                checkpoints=state.checkpoints, policy=state.release_policy,
                                on_finished=state.completions.notify)
    worker.requeue_interrupted(any_worker=True)
    reset_stale_evaluations(state.factory, "worker:embedded")
    state.worker = worker
    state._thread = threading.Thread(target=worker.run_forever, args=(state._stop,),
                                     name="loragate-worker", daemon=True)
    state._thread.start()
