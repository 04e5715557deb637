"""Anchors that hold the audit log to account from outside the database.

- **HMAC keys**: each new entry may carry HMAC-SHA256(key, entry_hash) and the key's id.
  Keys come from a file or the environment, never from the database, and rotate by id
  (the last key listed signs new entries; every listed key verifies old ones). Someone
  who can rewrite the table but lacks the key cannot recompute valid MACs.
- **Checkpoints**: signed statements of the head — (seq, entry_hash, RFC 6962 root over
  all entry hashes, time) — written as files to a directory outside the database, on every
  release decision and on a timer. A shortened or recomputed log no longer matches them,
  and they anchor inclusion and consistency proofs. Signatures are Ed25519 so auditors
  verify with the public key alone.

Must not import other loragate packages than audit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

HMAC_KEY_FILE_ENV = "LORAGATE_AUDIT_HMAC_KEY_FILE"
HMAC_KEY_ENV = "LORAGATE_AUDIT_HMAC_KEY"  # "key_id:hexsecret", for one key without a file
HMAC_INFO_KEY = "audit_hmac"  # where a session factory carries its HmacKeys (audit.db)
CHECKPOINT_VERSION = "loragate-audit-checkpoint/v1"
MIN_SECRET_BYTES = 32


class AnchorError(ValueError):
    """A key file or checkpoint that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class HmacKeys:
    """Key id → secret; `current` signs new entries."""

    secrets: dict[str, bytes]
    current: str

    def mac(self, entry_hash: str) -> tuple[str, str]:
        """(mac, key_id) for a new entry."""
        return self.mac_with(self.current, entry_hash), self.current

    def mac_with(self, key_id: str, entry_hash: str) -> str:
        return hmac.new(self.secrets[key_id], bytes.fromhex(entry_hash),
                        hashlib.sha256).hexdigest()

    def check(self, key_id: str | None, entry_hash: str, mac: str | None) -> str | None:
        """None when the MAC holds, else why not."""
        if mac is None or key_id is None:
            return "no MAC"
        if key_id not in self.secrets:
            return f"MAC made with unknown key id {key_id!r}"
        if not hmac.compare_digest(self.mac_with(key_id, entry_hash), mac):
            return f"MAC does not match (key id {key_id!r})"
        return None


def _parse_key_line(line: str, where: str) -> tuple[str, bytes]:
    key_id, sep, secret = line.strip().partition(":")
    if not sep or not key_id or not secret:
        raise AnchorError(f"{where}: expected 'key_id:hexsecret'")
    try:
        raw = bytes.fromhex(secret.strip())
    except ValueError as exc:
        raise AnchorError(f"{where}: the secret of key {key_id!r} is not hex") from exc
    if len(raw) < MIN_SECRET_BYTES:
        raise AnchorError(f"{where}: the secret of key {key_id!r} is shorter than "
                          f"{MIN_SECRET_BYTES} bytes")
    return key_id.strip(), raw


def load_hmac_keys(path: Path | None = None, env: dict[str, str] | None = None
                   ) -> HmacKeys | None:
    """Keys from `path`, else from $LORAGATE_AUDIT_HMAC_KEY_FILE or $LORAGATE_AUDIT_HMAC_KEY;
    None when none is configured. File: one `key_id:hexsecret` per line, '#' comments;
    the last key signs new entries."""
    env = dict(os.environ) if env is None else env
    if path is None and env.get(HMAC_KEY_FILE_ENV):
        path = Path(env[HMAC_KEY_FILE_ENV])
    if path is not None:
        try:
            text = path.read_text()
        except FileNotFoundError as exc:
            raise AnchorError(f"HMAC key file {path} does not exist") from exc
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), 1)
                 if ln.strip() and not ln.strip().startswith("#")]
        pairs = [_parse_key_line(ln, f"{path}:{n}") for n, ln in lines]
    elif env.get(HMAC_KEY_ENV):
        pairs = [_parse_key_line(env[HMAC_KEY_ENV], HMAC_KEY_ENV)]
    else:
        return None
    if not pairs:
        raise AnchorError(f"HMAC key file {path} holds no key")
    return HmacKeys(secrets=dict(pairs), current=pairs[-1][0])


def new_hmac_key_line(key_id: str) -> str:
    return f"{key_id}:{os.urandom(32).hex()}"


# ------------------------------------------------------------------ signing keys


def _load_pem(path: Path, what: str, loader: Any, kind: type[Any]) -> Any:
    try:
        key = loader(path.read_bytes())
    except FileNotFoundError as exc:
        raise AnchorError(f"{what} file {path} does not exist") from exc
    except ValueError as exc:
        raise AnchorError(f"{path} is not a PEM {what}: {exc}") from exc
    if not isinstance(key, kind):
        raise AnchorError(f"{path} is not an Ed25519 {what}")
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    return _load_pem(path, "private key",  # type: ignore[no-any-return]
                     lambda raw: serialization.load_pem_private_key(raw, password=None),
                     Ed25519PrivateKey)


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_pem(path, "public key",  # type: ignore[no-any-return]
                     serialization.load_pem_public_key, Ed25519PublicKey)


def write_signing_keypair(private_path: Path, public_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    private_path.chmod(0o600)
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


# ------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class TreeHead:
    """A checkpoint of the audit log: a statement of its head, the Merkle tree of the first
    `seq` entries (signed when a signing key is set)."""

    seq: int
    entry_hash: str
    merkle_root: str
    created_at: str
    reason: str
    signature: str | None = None  # base64 Ed25519 over `signed_bytes()`

    def signed_bytes(self) -> bytes:
        body = [CHECKPOINT_VERSION, self.seq, self.entry_hash, self.merkle_root,
                self.created_at, self.reason]
        return json.dumps(body, separators=(",", ":")).encode()

    def signed(self, key: Ed25519PrivateKey) -> TreeHead:
        sig = base64.b64encode(key.sign(self.signed_bytes())).decode()
        return TreeHead(**{**asdict(self), "signature": sig})

    def signature_ok(self, public: Ed25519PublicKey) -> bool:
        if not self.signature:
            return False
        try:
            public.verify(base64.b64decode(self.signature), self.signed_bytes())
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> str:
        return json.dumps({"version": CHECKPOINT_VERSION, **asdict(self)}, indent=2)

    @classmethod
    def from_file(cls, path: Path) -> TreeHead:
        try:
            raw = json.loads(path.read_text())
            if raw.pop("version") != CHECKPOINT_VERSION:
                raise AnchorError(f"{path}: not a {CHECKPOINT_VERSION} checkpoint")
            return cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise AnchorError(f"{path}: not a readable audit checkpoint ({exc})") from exc


def checkpoint_name(ckpt: TreeHead) -> str:
    stamp = ckpt.created_at.replace(":", "").replace("-", "").replace(".", "")
    return f"checkpoint-{ckpt.seq:012d}-{stamp}.json"


def save_checkpoint(directory: Path, ckpt: TreeHead) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(ckpt)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(ckpt.to_json())
    tmp.replace(path)
    return path


def read_checkpoints(directory: Path) -> list[TreeHead]:
    """Every checkpoint in `directory`, by seq."""
    if not directory.is_dir():
        raise AnchorError(f"checkpoint directory {directory} does not exist")
    found = [TreeHead.from_file(p) for p in sorted(directory.glob("checkpoint-*.json"))]
    return sorted(found, key=lambda c: (c.seq, c.created_at))
