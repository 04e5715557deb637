"""Run-time settings, from arguments and `LORAGATE_*` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audit.anchors import HmacKeys, load_hmac_keys, load_signing_key
from audit.db import sqlite_url
from audit.retention import DEFAULT_RETENTION_DAYS
from engine.registry import DEFAULT_BASE_MODEL
from engine.sizes import MAX_BODY_BYTES, MAX_DECOMPRESSED_BYTES
from policy.limits import Limits


@dataclass(frozen=True)
class RateLimits:
    """Each a `limits` string ("300/second", "5/minute;20/hour"); empty: no limit. Enforced
    by gateway.ratelimit. `storage` is a `limits` storage URI: "memory://" keeps the
    windows in this process; API processes that share a limit share a store such as
    "redis://host:6379" (with the `redis` package installed)."""

    per_key: str = "300/second"
    anonymous: str = "30/minute"
    access_requests: str = "5/minute;20/hour"
    storage: str = "memory://"


BATCH_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    database_url: str | None = None
    base_models: tuple[str, ...] = (DEFAULT_BASE_MODEL,)
    extra_models: dict[str, str] = field(default_factory=dict)
    run_worker: bool = True
    device: str | None = None
    # Run forward_backward jobs of different runs in one pass: None decides by device
    # (on accelerators only); True/False force it.
    batch_across_runs: bool | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # Hold a retrieve_future poll this long before answering 408 (SDK read timeout: 45 s).
    long_poll_seconds: float = 25.0
    # Re-check the database this often while long-polling (a worker in another process
    # cannot notify us in memory).
    poll_interval_seconds: float = 0.25
    limits: Limits = field(default_factory=Limits)
    # Default scopes of every key (None: the reviewed policy/default_scopes.toml).
    scopes_file: Path | None = None
    # Screening policy (None: the reviewed policy/default_screening.toml).
    screening_file: Path | None = None
    # Audit anchors (audit.anchors). HMAC keys: this file, else $LORAGATE_AUDIT_HMAC_KEY;
    # none means entries carry no MAC.
    audit_hmac_key_file: Path | None = None
    # Ed25519 key that signs checkpoints (unsigned checkpoints without one).
    audit_signing_key_file: Path | None = None
    # Where checkpoints go; None: <data_dir>/audit-checkpoints. Point it at storage the
    # database's writers cannot rewrite.
    audit_checkpoint_dir: Path | None = None
    # A checkpoint of the head this often while the log grows (0 = only on decisions).
    audit_checkpoint_seconds: float = 300.0
    # Release gate policy (None: the reviewed policy/default_release.toml).
    release_file: Path | None = None
    # How long external-weights download links stay valid.
    external_url_seconds: int = 900
    # Secret that signs download links; None: <data_dir>/url-signing.key (made on first use).
    url_signing_key_file: Path | None = None
    # Request bodies: the most bytes read off the wire, and the most a compressed body may
    # expand to; larger ones are refused with 413 before they are allocated.
    max_request_bytes: int = MAX_BODY_BYTES
    max_decompressed_bytes: int = MAX_DECOMPRESSED_BYTES
    # Per address (anonymous calls, access requests) and per key; 429 with Retry-After.
    rate_limits: RateLimits = field(default_factory=RateLimits)
    # Expired checkpoints (past their TTL) are deleted this often (0: never, by the worker).
    checkpoint_sweep_seconds: float = 60.0
    # Request and result payloads of futures (training tokens, prompts, samples) are purged
    # once the result is sent to its owner, or this many days after the future finished if
    # it never is (audit.retention); the API server purges this often (0: never by itself).
    payload_retention_days: float = DEFAULT_RETENTION_DAYS
    payload_purge_seconds: float = 600.0
    # "HOST:PORT" on which this process also serves its Prometheus metrics without a key
    # (a private network only; gateway.metrics). None: only the API's keyed GET /metrics.
    metrics_bind: str | None = None

    @property
    def database(self) -> str:
        return self.database_url or sqlite_url(self.data_dir)

    @property
    def checkpoint_root(self) -> Path:
        return (self.data_dir / "checkpoints").resolve()

    @property
    def checkpoint_dir(self) -> Path:
        return self.audit_checkpoint_dir or self.data_dir / "audit-checkpoints"

    @property
    def url_signing_key_path(self) -> Path:
        return self.url_signing_key_file or self.data_dir / "url-signing.key"

    def hmac_keys(self) -> HmacKeys | None:
        return load_hmac_keys(self.audit_hmac_key_file)

    def signing_key(self) -> Ed25519PrivateKey | None:
        return load_signing_key(self.audit_signing_key_file) if self.audit_signing_key_file \
            else None

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        settings = cls()
        if env.get("LORAGATE_DATA_DIR"):
            settings = replace(settings, data_dir=Path(env["LORAGATE_DATA_DIR"]))
        if env.get("LORAGATE_DATABASE_URL"):
            settings = replace(settings, database_url=env["LORAGATE_DATABASE_URL"])
        if env.get("LORAGATE_BASE_MODELS"):
            names = tuple(n.strip() for n in env["LORAGATE_BASE_MODELS"].split(",") if n.strip())
            settings = replace(settings, base_models=names)
        for name in ("audit_hmac_key_file", "audit_signing_key_file", "audit_checkpoint_dir",
                     "screening_file", "release_file", "url_signing_key_file"):
            if env.get(f"LORAGATE_{name.upper()}"):
                paths: dict[str, Any] = {name: Path(env[f"LORAGATE_{name.upper()}"])}
                settings = replace(settings, **paths)
        if env.get("LORAGATE_SCOPES_FILE"):
            settings = replace(settings, scopes_file=Path(env["LORAGATE_SCOPES_FILE"]))
        limits = {name: env[f"LORAGATE_RATE_LIMIT_{name.upper()}"] for name in
                  ("per_key", "anonymous", "access_requests", "storage")
                  if f"LORAGATE_RATE_LIMIT_{name.upper()}" in env}
        if limits:
            settings = replace(settings, rate_limits=replace(settings.rate_limits, **limits))
        if env.get("LORAGATE_PAYLOAD_RETENTION_DAYS"):
            days = float(env["LORAGATE_PAYLOAD_RETENTION_DAYS"])
            if not days >= 0:
                raise ValueError("LORAGATE_PAYLOAD_RETENTION_DAYS must be a number of days >= 0")
            settings = replace(settings, payload_retention_days=days)
        if env.get("LORAGATE_METRICS_BIND"):
            settings = replace(settings, metrics_bind=env["LORAGATE_METRICS_BIND"])
        if env.get("LORAGATE_DEVICE"):
            settings = replace(settings, device=env["LORAGATE_DEVICE"])
        if env.get("LORAGATE_BATCH_ACROSS_RUNS"):
            choice = env["LORAGATE_BATCH_ACROSS_RUNS"].strip().lower()
            if choice not in BATCH_CHOICES:
                raise ValueError("LORAGATE_BATCH_ACROSS_RUNS must be auto, on or off, got "
                                 f"{env['LORAGATE_BATCH_ACROSS_RUNS']!r}")
            settings = replace(settings, batch_across_runs=BATCH_CHOICES[choice])
        clean = {k: v for k, v in overrides.items() if v is not None}
        return replace(settings, **clean)  # type: ignore[arg-type]
