"""In-process wake-ups for long-polling `retrieve_future` callers.

The embedded worker calls `notify(request_id)` from its thread when a future resolves.
A poller registers with `watch(request_id)` *before* it reads the database, so a result
that lands between the read and the wait still wakes it. Pollers always re-read the
database; this only saves them from waiting for their next periodic check.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Event]


class Completions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[_Waiter]] = defaultdict(list)

    def notify(self, request_id: str) -> None:
        with self._lock:
            waiters = list(self._waiters.get(request_id, ()))
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    @contextlib.contextmanager
    def watch(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when `request_id` resolves, for as long as the block runs."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters[request_id].append(entry)
        try:
            yield entry[1]
        finally:
            with self._lock:
                waiters = self._waiters.get(request_id)
                if waiters is not None:
                    waiters.remove(entry)
                    if not waiters:
                        del self._waiters[request_id]
