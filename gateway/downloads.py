"""External-weights downloads: signed, expiring, owner-only links to a released adapter
in PEFT's format.

A link names (checkpoint id, owner, file, expiry) and carries an HMAC over them with a
server secret (`<data_dir>/url-signing.key`, created on first use, or
`LORAGATE_URL_SIGNING_KEY_FILE`). Fetching it needs the link *and* the owner's API key;
the checkpoint must still be released when the bytes are read. The files are exactly
`adapter_config.json` (a PEFT LoraConfig written from the checkpoint's manifest) and
`adapter_model.safetensors` (the adapter tensors, already keyed as PEFT saves them) —
never base weights. Must not decide release state.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoints import ADAPTER_FILE, MANIFEST_FILE
from engine.values import LoraSpec

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FILES = (PEFT_CONFIG, PEFT_WEIGHTS)


class LinkError(ValueError):
    """A download link that is malformed, forged or expired (the message says which)."""


@dataclass(frozen=True)
class Link:
    checkpoint_id: int
    principal_id: str
    filename: str
    expires: int  # unix seconds


def signing_secret(path: Path) -> bytes:
    """The server's link-signing secret, created (mode 0600) on first use; read once at
    start-up (gateway.state)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a temporary name and linked in place: API processes starting
        # together agree on one secret and none reads a half-written file.
        staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
        try:
            os.link(staged, path)
        except FileExistsError:
            pass  # another process won; use its secret
        finally:
            staged.unlink()
    return bytes.fromhex(path.read_text().strip())


def _signature(secret: bytes, link: Link) -> str:
    message = f"{link.checkpoint_id}|{link.principal_id}|{link.filename}|{link.expires}"
    return hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


def sign(secret: bytes, link: Link) -> str:
    body = json.dumps([link.checkpoint_id, link.principal_id, link.filename, link.expires],
                      separators=(",", ":")).encode()
    token = base64.urlsafe_b64encode(body).decode().rstrip("=")
    return f"{token}.{_signature(secret, link)}"


def verify(secret: bytes, token: str, now: dt.datetime | None = None) -> Link:
    body, _, signature = token.partition(".")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        ckpt_id, principal_id, filename, expires = json.loads(raw)
        link = Link(int(ckpt_id), str(principal_id), str(filename), int(expires))
    except (ValueError, TypeError) as exc:
        raise LinkError("this download link is malformed") from exc
    if not hmac.compare_digest(signature, _signature(secret, link)):
        raise LinkError("this download link's signature does not match")
    moment = now or dt.datetime.now(dt.UTC)
    if moment.timestamp() > link.expires:
        when = dt.datetime.fromtimestamp(link.expires, dt.UTC).isoformat()
        raise LinkError(f"this download link expired at {when}; ask for new URLs with "
                        "get_external_weights_urls")
    return link


def peft_config(checkpoint_dir: Path) -> dict[str, Any]:
    """adapter_config.json for `PeftModel.from_pretrained`, from the checkpoint manifest."""
    manifest = json.loads((checkpoint_dir / MANIFEST_FILE).read_text())
    lora = manifest["lora"]
    targets = LoraSpec(rank=int(lora["rank"]), train_mlp=bool(lora.get("train_mlp", True)),
                       train_attn=bool(lora.get("train_attn", True)),
                       train_unembed=bool(lora.get("train_unembed", True))).target_modules()
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
            "base_model_name_or_path": manifest["base_model"], "r": int(lora["rank"]),
            "lora_alpha": float(manifest["lora_alpha"]), "lora_dropout": 0.0, "bias": "none",
            "target_modules": targets, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False}


def file_bytes(checkpoint_dir: Path, filename: str) -> bytes:
    if filename == PEFT_CONFIG:
        return (json.dumps(peft_config(checkpoint_dir), indent=2) + "\n").encode()
    if filename == PEFT_WEIGHTS:
        return (checkpoint_dir / ADAPTER_FILE).read_bytes()
    raise LinkError(f"{filename} is not an adapter file; files are {', '.join(FILES)}")
