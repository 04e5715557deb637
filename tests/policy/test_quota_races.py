"""Requests racing for the last unit of a quota: exactly one wins, on SQLite and on
PostgreSQL. The key's row is locked before counting (SQLite: the write transaction),
so the check and the reservation cannot interleave."""

from __future__ import annotations

import threading

import tinker

from audit import usage
from audit.db import make_engine, make_sessionmaker, transaction
from migrations import upgrade_to_head
from policy import quotas
from policy.keys import authenticate, create_key
from policy.scopes import effective, load_defaults
from tests.api.helpers import TINY, service

RACERS = 6


def _race(n: int, attempt) -> list[BaseException | None]:
    """Run `attempt()` in n threads released together; each result is None or the error."""
    barrier = threading.Barrier(n)
    results: list[BaseException | None] = [None] * n

    def run(i: int) -> None:
        try:
            attempt(barrier)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_racing_reservations_for_the_last_training_tokens_admit_exactly_one(database_url):
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    defaults = load_defaults()
    with transaction(factory) as session:
        plaintext = create_key(session, owner="racer", role="researcher", actor="test",
                               defaults=defaults, scopes={"training_tokens_per_day": 100})
    with transaction(factory) as session:
        _, key = authenticate(session, plaintext)
        key_id, scopes = key.id, effective(defaults, key.scopes)

    def attempt(barrier: threading.Barrier) -> None:
        with transaction(factory) as session:
            barrier.wait()  # every racer is inside its own transaction before anyone counts
            quotas.reserve(session, key_id, scopes, quotas.Charge(training_tokens=60))

    try:
        results = _race(RACERS, attempt)
        errors = [r for r in results if r is not None]
        assert len(errors) == RACERS - 1, errors
        assert all(isinstance(e, quotas.QuotaExceeded) for e in errors), errors
        with transaction(factory) as session:
            totals = usage.day_totals(session, key_id, usage.utc_day())
        assert totals["training_tokens_reserved"] == 60
    finally:
        engine.dispose()


def test_two_sdk_clients_racing_for_the_last_run_slot_get_one_run(server):
    key = server.create_key(scopes={"concurrent_training_runs": 1})
    clients = [service(server, key) for _ in range(2)]
    it = iter(clients)
    lock = threading.Lock()

    def attempt(barrier: threading.Barrier) -> None:
        with lock:
            sc = next(it)
        barrier.wait()
        sc.create_lora_training_client(base_model=TINY, rank=4).result()

    results = _race(2, attempt)
    errors = [r for r in results if r is not None]
    assert len(errors) == 1, results
    assert isinstance(errors[0], tinker.PermissionDeniedError)
    assert "concurrent_training_runs" in str(errors[0])
    for sc in clients:
        sc.close("success").result()

