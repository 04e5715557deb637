"""Signed checkpoints of the audit head written outside the database: on demand (every
release decision) and on a timer while the log grows (audit.log.write_checkpoint does the
writing). Must not hold request data."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session, sessionmaker

from audit import log as audit_log
from audit.db import transaction

logger = logging.getLogger("loragate.gateway")


class Checkpointer:
    """Writes signed checkpoints of the audit head outside the database: on demand (every
    release decision) and on a timer while the log grows."""

    def __init__(self, factory: sessionmaker[Session], directory: Path,
                 signing_key: Ed25519PrivateKey | None) -> None:
        self.factory, self.directory, self.signing_key = factory, directory, signing_key
        self.last_seq = 0
        self._lock = threading.Lock()

    @property
    def signed(self) -> bool:
        return self.signing_key is not None

    def write(self, reason: str, *, only_if_grown: bool = False) -> Path | None:
        with self._lock, transaction(self.factory) as session:
            written = audit_log.write_checkpoint(
                session, self.directory, reason, self.signing_key,
                after_seq=self.last_seq if only_if_grown else 0)
        if written is None:
            return None
        ckpt, path = written
        self.last_seq = ckpt.seq
        logger.info("audit checkpoint", extra={"seq": ckpt.seq, "path": str(path),
                                               "reason": reason})
        return path

    def run_every(self, seconds: float, stop: threading.Event) -> None:
        while not stop.wait(seconds):
            try:
                self.write("timer", only_if_grown=True)
            except Exception:  # a full disk must not kill the thread silently
                logger.exception("writing an audit checkpoint failed")
        self.write("shutdown", only_if_grown=True)
