"""External-weights downloads: signed, short-lived links to one file of a released adapter
in PEFT's format, optionally age-encrypted to the recipients named at export.

A link is a capability: it names (checkpoint id, principal, the API key that asked for it,
file, expiry) and carries an HMAC-SHA256 over exactly those bytes with a server secret
(`<data_dir>/url-signing.key`, created on first use, or `LORAGATE_URL_SIGNING_KEY_FILE`).
It authenticates on its own — plain GETs such as the cookbook's `weights.download()` need no
header — or together with the owner's API key. Either way the caller checks, when the bytes
are read, that the issuing key is still usable, that casbin still allows its principal to
export weights, and that the checkpoint still exists, is unexpired and is released
(gateway.routes.release). The files are exactly `adapter_config.json` (a PEFT LoraConfig
written from the checkpoint's manifest) and `adapter_model.safetensors` (the adapter tensors,
already keyed as PEFT saves them) — never base weights. An export made with
`age_encryption_recipients` is served only as `<file>.age`, encrypted to those recipients
at read time (the stored files stay plaintext for the gateway's own release evaluation).
Must not decide release state.
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

import pyrage

from engine.checkpoints import ADAPTER_FILE, MANIFEST_FILE
from engine.values import LoraSpec

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
FILES = (PEFT_CONFIG, PEFT_WEIGHTS)
AGE_SUFFIX = ".age"  # the SDK's and cookbook's name for an age-encrypted file
# Bounds on `age_encryption_recipients`: a few keys, each at most a long SSH RSA key.
MAX_RECIPIENTS = 16
MAX_RECIPIENT_CHARS = 4096
# Domain separation: this secret's MACs over a link body mean nothing else.
_LINK_DOMAIN = b"loragate/external-weights-link/v2\n"
_LINK_VERSION = 2


class LinkError(ValueError):
    """A download link that is malformed, forged or expired (the message says which)."""


class RecipientError(ValueError):
    """An `age_encryption_recipients` entry that is not an age or SSH public key (the
    message names it)."""


@dataclass(frozen=True)
class Link:
    checkpoint_id: int
    principal_id: str
    filename: str
    expires: int  # unix seconds
    key_id: str = ""  # the API key that asked for the link; a link without one needs a key


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


def _mac(secret: bytes, body: bytes) -> str:
    return hmac.new(secret, _LINK_DOMAIN + body, hashlib.sha256).hexdigest()


def sign(secret: bytes, link: Link) -> str:
    body = json.dumps([_LINK_VERSION, link.checkpoint_id, link.principal_id, link.key_id,
                       link.filename, link.expires], separators=(",", ":")).encode()
    token = base64.urlsafe_b64encode(body).decode().rstrip("=")
    return f"{token}.{_mac(secret, body)}"


def verify(secret: bytes, token: str, now: dt.datetime | None = None,
           max_lifetime: int | None = None) -> Link:
    """The link a token carries, once its MAC matches (checked before anything in it is
    believed) and it has not expired; `max_lifetime` also refuses links that outlive the
    lifetime in force (one issued under a longer setting)."""
    body, _, signature = token.partition(".")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except ValueError as exc:
        raise LinkError("this download link is malformed") from exc
    if not hmac.compare_digest(signature.encode(), _mac(secret, raw).encode()):
        raise LinkError("this download link's signature does not match")
    try:
        version, ckpt_id, principal_id, key_id, filename, expires = json.loads(raw)
        if version != _LINK_VERSION:
            raise ValueError(version)
        link = Link(int(ckpt_id), str(principal_id), str(filename), int(expires), str(key_id))
    except (ValueError, TypeError) as exc:
        raise LinkError("this download link is malformed") from exc
    moment = (now or dt.datetime.now(dt.UTC)).timestamp()
    if moment > link.expires:
        when = dt.datetime.fromtimestamp(link.expires, dt.UTC).isoformat()
        raise LinkError(f"this download link expired at {when}; ask for new URLs with "
                        "get_external_weights_urls")
    if max_lifetime is not None and link.expires - moment > max_lifetime + 60:
        raise LinkError("this download link outlives the link lifetime in force; ask for new "
                        "URLs with get_external_weights_urls")
    return link


# -- age encryption ---------------------------------------------------------------------

AgeRecipient = pyrage.x25519.Recipient | pyrage.ssh.Recipient


def parse_recipients(values: list[str]) -> list[AgeRecipient]:
    """age recipients from their text: native `age1…` keys or SSH public keys
    (`ssh-ed25519 …`, `ssh-rsa …`), as the SDK documents. RecipientError names the first
    that is not one."""
    if not values:
        raise RecipientError("age_encryption_recipients is empty; leave it out for "
                             "unencrypted files")
    if len(values) > MAX_RECIPIENTS:
        raise RecipientError(f"at most {MAX_RECIPIENTS} age_encryption_recipients, got "
                             f"{len(values)}")
    parsed: list[AgeRecipient] = []
    for value in values:
        shown = repr(value[:80] + ("…" if len(value) > 80 else ""))
        if len(value) > MAX_RECIPIENT_CHARS:
            raise RecipientError(f"age_encryption_recipients: {shown} is too long for a "
                                 "public key")
        try:
            if value.startswith("age1"):
                parsed.append(pyrage.x25519.Recipient.from_str(value))
            elif value.startswith("ssh-"):
                parsed.append(pyrage.ssh.Recipient.from_str(value))
            else:
                raise ValueError(value)
        except (ValueError, pyrage.RecipientError) as exc:
            raise RecipientError(
                f"age_encryption_recipients: {shown} is not an age recipient (an 'age1…' "
                "X25519 public key or an 'ssh-ed25519'/'ssh-rsa' public key)") from exc
    return parsed


def served_files(recipients: list[str] | None) -> tuple[str, ...]:
    """The names an export's links serve: the PEFT files, or their `.age` forms when the
    export was made with recipients (never both)."""
    return tuple(f + AGE_SUFFIX for f in FILES) if recipients else FILES


def plaintext_name(filename: str, recipients: list[str] | None) -> str:
    """The PEFT file behind a served name; LinkError for a name this export does not serve
    (a plaintext name of an encrypted export included)."""
    if filename not in served_files(recipients):
        raise LinkError(f"{filename} is not a file of this export; its files are "
                        f"{', '.join(served_files(recipients))}")
    return filename.removesuffix(AGE_SUFFIX) if recipients else filename


def encrypt(data: bytes, recipients: list[str]) -> bytes:
    """`data` age-encrypted (binary format) to every recipient; each call uses a fresh file
    key, so two downloads of one file differ."""
    return pyrage.encrypt(data, parse_recipients(recipients))


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
