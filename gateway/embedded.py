"""Run the gateway under uvicorn in a background thread of the current process.

For tests, benchmarks and notebooks that want a real server on 127.0.0.1 without a
subprocess; `loragate serve` is the way to run it for real.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings
from gateway.state import AppState


@dataclass
class RunningGateway:
    base_url: str
    app: FastAPI
    settings: Settings

    @property
    def state(self) -> AppState:
        return self.app.state.loragate  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(settings: Settings, start_timeout: float = 300) -> Iterator[RunningGateway]:
    """Start the app on a free loopback port; stop it when the block exits."""
    import uvicorn

    settings = replace(settings, host="127.0.0.1", port=free_port())
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="loragate-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start; see the log above")
        time.sleep(0.02)
    try:
        yield RunningGateway(f"http://{settings.host}:{settings.port}", app, settings)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
