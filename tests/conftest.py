"""Shared fixtures: databases (SQLite always; PostgreSQL when LORAGATE_TEST_DATABASE_URL is
set), a live gateway on 127.0.0.1 serving the tiny test model, and API keys.

Schemas are created only by Alembic (migrations.upgrade_to_head). Nothing here touches the
network beyond loopback and the local PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

PG_ENV = "LORAGATE_TEST_DATABASE_URL"
TINY = "loragate/tiny-llama"


def _dialects() -> list[str]:
    return ["sqlite", "postgresql"] if os.environ.get(PG_ENV) else ["sqlite"]


_sdk_holders: list[Any] = []


@pytest.fixture(scope="session", autouse=True)
def _track_sdk_clients() -> Iterator[None]:
    """Record every SDK client holder (the object that runs a session's heartbeats)."""
    from tinker.lib.internal_client_holder import InternalClientHolder

    original = InternalClientHolder.__init__

    def tracked(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _sdk_holders.append(self)

    InternalClientHolder.__init__ = tracked  # type: ignore[method-assign]
    yield
    InternalClientHolder.__init__ = original  # type: ignore[method-assign]


@pytest.fixture(scope="module", autouse=True)
def _close_sdk_clients(_track_sdk_clients: None) -> Iterator[None]:
    """Close the SDK clients a test module opened once the module is done. The SDK keeps a
    session heartbeating every 10 s until it is closed; left open, the hundreds of sessions a
    run creates kept the session-scoped servers busy answering them and made the SmolLM2
    tests at the end of a full run twice as slow as on their own. Closing is local: it
    cancels the heartbeats and pollers and sends nothing."""
    first = len(_sdk_holders)
    yield
    for holder in _sdk_holders[first:]:
        holder.close()
    del _sdk_holders[first:]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir for materialized base models, shared by every server in the run."""
    return tmp_path_factory.mktemp("models")


def _fresh_pg_database(base_url: str) -> tuple[str, Callable[[], None]]:
    """A new, empty database next to the one named by LORAGATE_TEST_DATABASE_URL."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from audit.db import normalize_url

    url = make_url(normalize_url(base_url))
    name = f"{url.database}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    return url.set(database=name).render_as_string(hide_password=False), drop


@pytest.fixture(params=_dialects())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each dialect under test (function scope)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    url, drop = _fresh_pg_database(os.environ[PG_ENV])
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def factory(database_url: str) -> Iterator[Any]:
    """A session factory on a freshly migrated database of each dialect."""
    from audit.db import make_engine, make_sessionmaker
    from migrations import upgrade_to_head

    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    engine.dispose()


@dataclass
class LiveServer:
    base_url: str
    app: object
    data_dir: Path
    database_url: str

    @property
    def state(self):
        return self.app.state.loragate

    def create_key(self, owner: str | None = None, role: str = "researcher",
                   scopes: dict | None = None) -> str:
        from audit.db import transaction
        from policy.keys import create_key

        with transaction(self.state.factory) as session:
            return create_key(session, owner=owner or f"user-{uuid.uuid4().hex[:8]}",
                              role=role, actor="test", scopes=scopes,
                              defaults=self.state.scope_defaults)


@contextlib.contextmanager
def run_server(settings) -> Iterator[LiveServer]:
    """The real app under uvicorn on a free loopback port."""
    from gateway.embedded import serve_in_thread

    with serve_in_thread(settings) as running:
        yield LiveServer(running.base_url, running.app, settings.data_dir, settings.database)


def tiny_settings(data_dir: Path, database_url: str, **overrides: object):
    """Settings for a test server. Anonymous calls and access requests are not rate-limited
    (every test calls from 127.0.0.1); tests/security sets its own limits."""
    from gateway.settings import RateLimits, Settings

    return replace(Settings(data_dir=data_dir, database_url=database_url, base_models=(TINY,),
                            long_poll_seconds=5.0, poll_interval_seconds=0.05,
                            rate_limits=RateLimits(anonymous="", access_requests="")),
                   **overrides)


@pytest.fixture(scope="session", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A live gateway with an embedded worker serving the tiny model, one per dialect."""
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('db') / 'gw.db'}", (lambda: None)
    else:
        url, drop = _fresh_pg_database(os.environ[PG_ENV])
    try:
        with run_server(tiny_settings(models_dir, url)) as live:
            yield live
    finally:
        drop()


@pytest.fixture(scope="session")
def smol_gateway(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The one SmolLM2 gateway of the slow tests (API here, worker in its own process, as
    benchmarks/release_bench.py runs it): the demo's release policy, the likelihood suites
    with the shipped calibration (the generation suites stay in `make bench-release`)."""
    from benchmarks.release_bench import gateway
    from examples.demo import demo_release_policy

    policy = demo_release_policy(tmp_path_factory.mktemp("policy"), full_gate=False)
    with gateway(models_dir, policy) as running:
        yield running


@pytest.fixture
def api_key(server: LiveServer) -> str:
    return server.create_key()


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("LORAGATE_REQUIRE_POSTGRES") == "1" and not os.environ.get(PG_ENV):
        raise pytest.UsageError(
            f"LORAGATE_REQUIRE_POSTGRES=1 but {PG_ENV} is not set: the PostgreSQL tests "
            "would be skipped"
        )
