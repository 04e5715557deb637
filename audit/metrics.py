"""Prometheus metrics of audit appends made in this process: how long `audit.log.append`
takes and how many appends raised.

In-process values on prometheus_client's default registry: each process (the API, every
`loragate worker`) counts only its own appends; the gateway's /metrics shows the API
process's. Must not decide anything, and must not import other loragate packages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

# An append is about a millisecond alone; waiting on the PostgreSQL head lock behind
# other writers makes it longer.
APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0)

APPEND_SECONDS = Histogram(
    "loragate_audit_append_seconds",
    "Seconds spent in audit.log.append in this process, successful appends only (on "
    "PostgreSQL this includes waiting for the head lock; on SQLite the write lock is "
    "taken earlier, when the transaction begins)",
    buckets=APPEND_BUCKETS)
APPEND_FAILURES = Counter(
    "loragate_audit_append_failures",
    "audit.log.append calls in this process that raised (the caller's transaction does "
    "not commit; see loragate_refusal_audit_failures_total for rows lost for good)")


@contextmanager
def timed_append() -> Iterator[None]:
    """Observe the block's duration when it succeeds; count it when it raises."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        APPEND_FAILURES.inc()
        raise
    APPEND_SECONDS.observe(time.perf_counter() - started)
