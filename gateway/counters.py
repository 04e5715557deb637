"""Process-wide counters of events that must never pass silently — today, refused requests
whose audit row could not be written even after retries — for operators' logs and a
metrics endpoint to read. Must not decide anything."""

from __future__ import annotations

import threading


class Counter:
    """A thread-safe, monotonically increasing count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._value = 0
        self._lock = threading.Lock()

    def increment(self) -> int:
        with self._lock:
            self._value += 1
            return self._value

    @property
    def value(self) -> int:
        return self._value


# Refused requests left without an audit row (every retry failed); each is also logged.
REFUSAL_AUDIT_FAILURES = Counter("loragate_refusal_audit_failures_total")


def snapshot() -> dict[str, int]:
    return {c.name: c.value for c in (REFUSAL_AUDIT_FAILURES,)}
