"""The application's lifespan state: built once at start-up, torn down at shutdown.

Owns wiring only — database engines, the model registry and its metadata, the
completion notifier and (embedded mode) the worker thread. Holds no request data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import make_engine, make_sessionmaker, transaction
from engine.backend import ModelInfo
from engine.registry import ModelRegistry
from gateway.completions import Completions
from gateway.settings import Settings
from migrations import upgrade_to_head
from policy.authz import Authorizer, seed_default_policy
from policy.scopes import Scopes, load_defaults

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
    admission_checks: list[AdmissionCheck] = field(default_factory=list)
    worker: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

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
        self.engine.dispose()
        self.read_engine.dispose()


def build_state(settings: Settings) -> AppState:
    """Migrate the database, prepare base models, start the embedded worker."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.database
    upgrade_to_head(url)
    engine, read_engine = make_engine(url), make_engine(url, read_only=True)
    factory, read_factory = make_sessionmaker(engine), make_sessionmaker(read_engine)
    registry = ModelRegistry(settings.data_dir, settings.extra_models)
    models = {name: registry.info(name) for name in settings.base_models}
    with transaction(factory) as session:
        seed_default_policy(session)
    authorizer = Authorizer(read_factory)  # it only ever reads the rules
    authorizer.load()
    scope_defaults = load_defaults(settings.scopes_file)
    state = AppState(
        settings=settings, engine=engine, read_engine=read_engine, factory=factory,
        read_factory=read_factory, registry=registry, models=models,
        completions=Completions(), authorizer=authorizer, scope_defaults=scope_defaults,
    )
    with transaction(state.factory) as session:
        audit_log.append(session, actor="system", event_type="gateway.start", decision="info",
                         payload={"base_models": sorted(models), "worker": settings.run_worker,
                                  "database": engine.dialect.name,
                                  "default_scopes_sha256": scope_defaults.digest()})
    if settings.run_worker:
        _start_worker(state)
    return state


def _start_worker(state: AppState) -> None:
    from engine.worker import Worker

    worker = Worker(state.factory, state.registry, state.settings.checkpoint_root,
                    worker_id="embedded", device=state.settings.device,
                    on_finished=state.completions.notify)
    worker.fail_interrupted()
    state.worker = worker
    state._thread = threading.Thread(target=worker.run_forever, args=(state._stop,),
                                     name="loragate-worker", daemon=True)
    state._thread.start()
