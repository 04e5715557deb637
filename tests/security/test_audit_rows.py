"""Every call leaves its audit row, on SQLite and PostgreSQL: a refusal whose path or ids
are longer than the audit columns (or carry a NUL) still leaves exactly one row, with a
prefix and the SHA-256 of what did not fit; a refusal whose audit write fails is retried,
and one that keeps failing is logged and counted, never dropped silently."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from audit import log as audit_log
from audit.log import storable
from gateway.counters import REFUSAL_AUDIT_FAILURES
from tests.conftest import LiveServer, _dialects
from tests.security.conftest import audit_rows, module_server


@pytest.fixture(scope="module", params=_dialects())
def server(request: pytest.FixtureRequest, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with module_server(request.param, models_dir, tmp_path_factory.mktemp("audit-rows"),
                       run_worker=False) as live:
        yield live


def _call(server: LiveServer, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.request(method, f"{server.base_url}{path}", headers=headers, timeout=30)


def _only_row(server: LiveServer, resp: httpx.Response):
    rows = audit_rows(server, resp.headers["X-Request-Id"])
    assert len(rows) == 1, (resp.status_code, resp.text)
    return rows[0]


LONG = "x" * 3000


@pytest.mark.parametrize("method, path, keyed, status", [
    ("GET", f"/api/v1/training_runs/{LONG}", True, 404),
    ("GET", f"/api/v1/training_runs/{LONG}/checkpoints", False, 401),
    ("DELETE", f"/api/v1/training_runs/{LONG}/checkpoints/weights/{LONG}", True, 404),
    ("GET", f"/api/v1/no/such/endpoint/{LONG}", True, 404),
    ("GET", "/api/v1/training_runs/a%00b", True, 400),
    ("GET", "/api/v1/" + "é" * 2000, False, 404),
])
def test_a_refusal_with_long_or_odd_paths_leaves_exactly_one_row(server, method, path, keyed,
                                                                 status):
    resp = _call(server, method, path, server.create_key() if keyed else None)
    assert resp.status_code == status, resp.text
    row = _only_row(server, resp)
    assert row.decision == "deny"
    assert len(row.subject) <= 400 and len(row.event_type) <= 80
    whole = storable(httpx.URL(f"{server.base_url}{path}").path)
    if len(whole) > 400:  # a prefix plus the digest of the whole path
        assert whole.startswith(row.subject.split("…sha256:")[0])
        assert row.subject.endswith(hashlib.sha256(whole.encode()).hexdigest())
    else:
        assert row.subject == whole and "\x00" not in row.subject


def test_the_chain_still_verifies_after_fitted_rows(server):
    _call(server, "GET", f"/api/v1/training_runs/{LONG}", server.create_key())
    from audit.db import transaction

    with transaction(server.state.read_factory) as session:
        assert audit_log.verify(session).ok


@pytest.fixture
def failing_appends(monkeypatch: pytest.MonkeyPatch):
    """Make audit appends whose subject carries a marker fail `times` times per request
    (-1: always), counting the attempts."""
    attempts: dict[str, int] = {}
    original = audit_log.append

    def arm(marker: str, times: int) -> dict[str, int]:
        def append(session, **entry):
            if marker in entry.get("subject", ""):
                attempts[marker] = attempts.get(marker, 0) + 1
                if times < 0 or attempts[marker] <= times:
                    raise RuntimeError("simulated audit write failure")
            return original(session, **entry)

        monkeypatch.setattr(audit_log, "append", append)
        return attempts

    return arm


def test_a_failed_refusal_audit_write_is_retried(server, failing_appends):
    attempts = failing_appends("retry-me", 1)
    before = REFUSAL_AUDIT_FAILURES.value
    resp = _call(server, "GET", "/api/v1/training_runs/retry-me", server.create_key())
    assert resp.status_code == 404
    row = _only_row(server, resp)
    assert row.subject == "/api/v1/training_runs/retry-me" and attempts["retry-me"] == 2
    assert REFUSAL_AUDIT_FAILURES.value == before


def test_a_refusal_audit_write_that_keeps_failing_is_logged_and_counted(
        server, failing_appends, caplog):
    attempts = failing_appends("never-audited", -1)
    before = REFUSAL_AUDIT_FAILURES.value
    with caplog.at_level(logging.WARNING, logger="loragate.gateway"):
        resp = _call(server, "GET", "/api/v1/training_runs/never-audited", server.create_key())
    assert resp.status_code == 404, "the caller still gets the refusal"
    assert audit_rows(server, resp.headers["X-Request-Id"]) == []
    assert attempts["never-audited"] >= 3
    assert REFUSAL_AUDIT_FAILURES.value == before + 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("could not audit a refused request" in m and resp.headers["X-Request-Id"] in m
               for m in errors), errors
