"""SHA-256 digests of the files whose exact bytes the gateway pins: classifier weights,
base-model and adapter weights. Streams the files (weights run to hundreds of MB). Must not
interpret what it hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path


def files_sha256(paths: list[Path]) -> str:
    """One SHA-256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    return files_sha256([path])
