"""The console's signed session cookie and its CSRF tokens.

Owns the cookie's format: `base64url(JSON {key id, nonce, expiry}) "." base64url(HMAC)`,
signed with a key derived from the deployment's secret (the one that signs download
links), so the cookie names the API key's *id*, never the key itself. A valid signature
only says which key signed in and until when: the key is looked up again on every request
(gateway.console.context), so a revoked or expired key stops working at once. CSRF tokens
are HMACs of the session's nonce (or, before sign-in, of the login form's own nonce).

Pure functions: must not touch the database, the request or the policy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from policy.errors import KeyRejected

COOKIE = "loragate_console"
LOGIN_COOKIE = "loragate_console_login"  # the login form's CSRF nonce, before a session
SESSION_SECONDS = 30 * 60
LOGIN_FORM_SECONDS = 30 * 60
_DOMAIN = b"loragate-console-session/v1"


class SessionInvalid(KeyRejected):
    """No usable console session (missing, tampered with or expired): sign in again."""


@dataclass(frozen=True)
class Grant:
    """What a valid cookie says: which API key signed in, its CSRF nonce, and until when."""

    key_id: str
    nonce: str
    expires: int


def console_secret(deployment_secret: bytes) -> bytes:
    """The console's own signing key, separate from the download links' by derivation."""
    return hmac.new(deployment_secret, _DOMAIN, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, body.encode(), hashlib.sha256).digest())


def new_nonce() -> str:
    return secrets.token_urlsafe(24)


def issue(secret: bytes, key_id: str, now: float | None = None) -> tuple[str, Grant]:
    """A fresh session for `key_id`: the cookie value and what it grants."""
    grant = Grant(key_id=key_id, nonce=new_nonce(),
                  expires=int((now or time.time()) + SESSION_SECONDS))
    body = _b64(json.dumps({"k": grant.key_id, "n": grant.nonce, "e": grant.expires},
                           separators=(",", ":")).encode())
    return f"{body}.{_mac(secret, body)}", grant


def verify(secret: bytes, token: str | None, now: float | None = None) -> Grant:
    """The grant of a cookie this deployment signed and that has not expired."""
    if not token:
        raise SessionInvalid("not signed in: sign in to the console with an API key")
    body, _, mac = token.partition(".")
    if not hmac.compare_digest(mac.encode(), _mac(secret, body).encode()):
        raise SessionInvalid("the console session is not valid: sign in again")
    try:
        fields = json.loads(_unb64(body))
        grant = Grant(key_id=str(fields["k"]), nonce=str(fields["n"]), expires=int(fields["e"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise SessionInvalid("the console session is not valid: sign in again") from exc
    if grant.expires <= (now or time.time()):
        raise SessionInvalid("the console session has expired: sign in again")
    return grant


def csrf_token(secret: bytes, nonce: str, purpose: str = "session") -> str:
    """The token forms carry: bound to one session (or one login form) and to its purpose."""
    return _mac(secret, f"csrf:{purpose}:{nonce}")


def csrf_ok(secret: bytes, nonce: str | None, presented: str | None,
            purpose: str = "session") -> bool:
    if not nonce or not presented:
        return False
    return hmac.compare_digest(presented.encode(), csrf_token(secret, nonce, purpose).encode())
