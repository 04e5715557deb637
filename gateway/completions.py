"""In-process wake-ups for long-polling `retrieve_future` callers.

The embedded worker calls `notify(request_id)` from its thread when a future resolves;
pollers waiting in the event loop wake at once instead of at their next database check.
Must not be relied on for correctness: pollers always re-read the database.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict


class Completions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(list)
        )

    def notify(self, request_id: str) -> None:
        with self._lock:
            waiters = self._waiters.pop(request_id, [])
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait(self, request_id: str, timeout: float) -> None:
        """Return when notified or after `timeout` seconds, whichever is first."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters[request_id].append(entry)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                waiters = self._waiters.get(request_id)
                if waiters and entry in waiters:
                    waiters.remove(entry)
                    if not waiters:
                        del self._waiters[request_id]
