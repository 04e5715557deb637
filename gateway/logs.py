"""Structured logs: one JSON object per line, with secrets redacted before rendering.

Every log line written while a request is handled carries that request's `request_id`
— the id its audit row carries — through structlog's context variables, which the
request middleware binds. Standard-library loggers (the worker's, uvicorn's) are rendered
by the same processors. Redaction removes anything shaped like an API key or claim
token (`tml-…`: the SDK's telemetry can echo the caller's X-API-Key) and the values of
fields named like credentials, wherever they appear in a line. Must not decide anything.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

KEY_SHAPE = re.compile(r"tml-[A-Za-z0-9_\-]{4,}")
CREDENTIAL_FIELDS = {"x-api-key", "x_api_key", "api_key", "authorization", "key",
                     "claim_token", "token", "secret"}
REDACTED = "[REDACTED]"


def redact(value: Any) -> Any:
    if isinstance(value, str):
        return KEY_SHAPE.sub("tml-" + REDACTED, value)
    if isinstance(value, dict):
        return {k: REDACTED if str(k).lower() in CREDENTIAL_FIELDS else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    return redact(dict(event))  # type: ignore[no-any-return]


SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.stdlib.ExtraAdder(),
]


def configure(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """JSON lines on `stream` (stderr) for structlog and standard-library loggers."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=SHARED,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _redact_processor,
                    structlog.processors.JSONRenderer()])
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    structlog.configure(
        processors=[*SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
