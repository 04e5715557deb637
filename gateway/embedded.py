"""Run the gateway in the background on a free loopback port: under uvicorn in a thread
of the current process (tests, notebooks), or as a `loragate serve` subprocess, as it is
deployed (demo, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

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


@contextlib.contextmanager
def serve_in_subprocess(data_dir: Path, *, env: dict[str, str] | None = None,
                        log: IO[str] | None = None, start_timeout: float = 600,
                        args: Sequence[str] = ()) -> Iterator[str]:
    """`loragate serve [args]` as its own process; yields its base URL, stops it
    afterwards. Output goes to `log` (stdout and stderr together) or is discarded."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--data-dir",
         str(data_dir), *args], env=env, stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    try:
        _wait_for_port(port, proc, start_timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("loragate serve exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"loragate serve did not start within {timeout:.0f} s")
