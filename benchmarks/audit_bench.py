"""Audit log throughput: appends per second on SQLite and PostgreSQL, and the time to
verify a log of 1,000,000 entries (chain, content hashes and the RFC 6962 root).

Targets on the 2-core development machine: at least 1,000 appends/s on SQLite, and
verification of 1M rows in under 30 s. Each append is its own transaction, as in the
gateway (one audit row per request). The 1M-row log is generated with valid hashes by
bulk insert (appending it one transaction at a time would take a quarter of an hour),
then verified through the same `audit.log.verify` the CLI uses.

    python benchmarks/audit_bench.py [--appends 3000] [--rows 1000000]
        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

PostgreSQL is measured when --postgres (or LORAGATE_TEST_DATABASE_URL) names a server;
a scratch database is created there and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from tqdm import tqdm

from audit import log as audit_log
from audit.db import make_engine, make_sessionmaker, normalize_url, transaction
from migrations import upgrade_to_head

APPENDS_TARGET = 1000.0
VERIFY_TARGET_SECONDS = 30.0


def measure_appends(url: str, n: int) -> float:
    upgrade_to_head(url)
    engine = make_engine(url)
    factory = make_sessionmaker(engine)
    payload = {"model_id": "sess-x:train:0", "tokens": 4096, "content_sha256": "ab" * 32}
    start = time.perf_counter()
    for i in tqdm(range(n), desc=f"appends ({engine.dialect.name})", unit="row"):
        with transaction(factory) as session:
            audit_log.append(session, actor="bench", event_type="bench.append",
                             decision="allow", subject=f"obj-{i}", payload=payload)
    rate = n / (time.perf_counter() - start)
    engine.dispose()
    return rate


def generate_log(path: Path, rows: int) -> None:
    """A valid chain of `rows` entries, written with plain executemany."""
    url = f"sqlite:///{path}"
    upgrade_to_head(url)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    prev, batch = audit_log.GENESIS_HASH, []
    for seq in tqdm(range(1, rows + 1), desc="generating the 1M-row log", unit="row",
                    mininterval=1.0):
        fields = {"seq": seq, "created_at": f"2026-11-21T12:00:{seq % 60:02d}.000000Z",
                  "actor": "p-bench", "event_type": "api.forward_backward",
                  "subject": f"sess-bench:train:{seq % 7}", "decision": "allow",
                  "request_id": f"req-{seq:032x}",
                  "payload": audit_log.canonical_json({"tokens": seq % 5000, "datums": 8}),
                  "prev_hash": prev}
        entry_hash = audit_log.compute_entry_hash(**fields)
        batch.append((*fields.values(), entry_hash, audit_log.HASH_VERSION))
        prev = entry_hash
        if len(batch) == 50_000:
            _insert(conn, batch)
            batch = []
    _insert(conn, batch)
    conn.close()


def _insert(conn: sqlite3.Connection, batch: list[tuple[object, ...]]) -> None:
    conn.executemany(
        "INSERT INTO audit_log (seq, created_at, actor, event_type, subject, decision, "
        "request_id, payload, prev_hash, entry_hash, hash_version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
    conn.commit()


def measure_verify(path: Path) -> tuple[float, audit_log.VerifyResult]:
    engine = make_engine(f"sqlite:///{path}", read_only=True)
    start = time.perf_counter()
    with transaction(make_sessionmaker(engine)) as session:
        result = audit_log.verify(session)
    seconds = time.perf_counter() - start
    engine.dispose()
    return seconds, result


def scratch_postgres(server_url: str) -> tuple[str, object]:
    name = f"loragate_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalize_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = normalize_url(server_url).rsplit("/", 1)[0]

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"{base}/{name}", drop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=os.environ.get("LORAGATE_TEST_DATABASE_URL"))
    args = parser.parse_args()
    results: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        rate = measure_appends(f"sqlite:///{Path(tmp) / 'appends.db'}", args.appends)
        results.append(f"SQLite appends/s: {rate:,.0f} (target >= {APPENDS_TARGET:,.0f}; "
                       f"ratio {rate / APPENDS_TARGET:.2f})")
        if args.postgres:
            url, drop = scratch_postgres(args.postgres)
            try:
                rate = measure_appends(url, args.appends)
            finally:
                drop()  # type: ignore[operator]
            results.append(f"PostgreSQL appends/s: {rate:,.0f}")
        else:
            results.append("PostgreSQL appends/s: skipped (no --postgres URL)")
        path = Path(tmp) / "million.db"
        generate_log(path, args.rows)
        seconds, result = measure_verify(path)
        assert result.ok and result.rows == args.rows, result.describe()
        results.append(f"verify {args.rows:,} rows: {seconds:.1f} s "
                       f"({args.rows / seconds:,.0f} rows/s; target < {VERIFY_TARGET_SECONDS:.0f}"
                       f" s for 1M; ratio {VERIFY_TARGET_SECONDS / seconds * args.rows / 1e6:.2f})")
    print("\n".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
