"""Reading the reviewed TOML files the project and its operators write (screening policy,
behaviour banks, rule files, the release policy, evaluation suites).

One reader, so that every such file is read the same way: its exact bytes come back for
the digest that audit rows and reports record, and a missing or malformed file raises the
caller's own error type with a message that names the file and what is wrong with it.
Must not interpret the data; each loader validates its own schema.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_toml(path: Path, what: str, error: type[Exception]) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and its parsed data; `what` names the file in errors."""
    try:
        raw = path.read_bytes()
        return raw, tomllib.loads(raw.decode())
    except FileNotFoundError as exc:
        raise error(f"{what} not found: {path}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from exc
