"""Fixtures for the security invariants: one live server per test module and dialect
(servers are costly), with the settings the module's invariants need."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_ENV, LiveServer, _fresh_pg_database, run_server, tiny_settings

# Override reasons (the two-person rule wants at least 10 characters each).
REASON = "the lab's biosecurity panel reviewed this adapter"
AGREE = {"reason": "second review agrees with the panel"}


@contextlib.contextmanager
def module_server(dialect: str, models_dir: Path, tmp: Path,
                  **overrides: object) -> Iterator[LiveServer]:
    """A live gateway on a fresh database of `dialect`, serving the tiny model."""
    if dialect == "sqlite":
        url, drop = f"sqlite:///{tmp / 'gw.db'}", (lambda: None)
    else:
        url, drop = _fresh_pg_database(os.environ[PG_ENV])
    try:
        with run_server(tiny_settings(models_dir, url, **overrides)) as live:
            yield live
    finally:
        drop()


@contextlib.contextmanager
def gate_server(request: pytest.FixtureRequest, models_dir: Path,
                tmp_path_factory: pytest.TempPathFactory, tag: str) -> Iterator[LiveServer]:
    """A module's server (dialect = the fixture's param) with the release gate's test
    policy (a small multiple-choice suite, so evaluations are quick)."""
    from tests.release.helpers import write_quick_release_policy

    policy = write_quick_release_policy(tmp_path_factory.mktemp(f"{tag}-policy"))
    with module_server(request.param, models_dir, tmp_path_factory.mktemp(tag),
                       release_file=policy) as live:
        yield live


def audit_rows(server: LiveServer, request_id: str) -> list:
    """The audit entries a request left (by the request id its response carries)."""
    from sqlalchemy import select

    from audit.db import transaction
    from audit.models import AuditEntry

    with transaction(server.state.read_factory) as session:
        return list(session.scalars(select(AuditEntry).where(
            AuditEntry.request_id == request_id).order_by(AuditEntry.seq)))

