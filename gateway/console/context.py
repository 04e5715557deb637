"""Who is calling a console page, and the page's unit of work.

Owns turning a console request into the same `RequestContext` the API routes get: the
session cookie is checked (gateway.console.session) and its API key looked up again on
every request (revoked or expired keys stop at once), the caller is rate-limited like an
API key, and casbin decides `console, use` and then the page's own permission
(gateway.console.permissions) before any form is read. POSTs are parsed (bounded,
url-encoded) and their CSRF token checked before the page's handler runs. The audit row
and commit come from the API's own unit of work (gateway.context), so a console page
leaves exactly one audit row like any API call, and a refusal changes nothing.

Must not render HTML or decide anything the policy decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs

from fastapi import Request
from sqlalchemy.orm import Session

from audit.db import transaction
from audit.models import ApiKey, Principal, as_utc, utcnow
from gateway.bodies import CALLER_CHECKED, read_body
from gateway.console import session as cookies
from gateway.console.permissions import CONSOLE_PERMISSIONS, CONSOLE_USE
from gateway.context import (
    RequestContext,
    anonymous_context,
    app_state,
    check_path,
    client_address,
    route_event,
)
from gateway.errors import Forbidden, Unprocessable
from gateway.state import AppState
from policy.scopes import effective

FORM_TYPE = "application/x-www-form-urlencoded"
CSRF_FIELD = "csrf_token"


@dataclass
class Page:
    """What a console handler gets: the request, its context (session, principal, audit
    note), the signed-in grant (None on the sign-in form) and the parsed form."""

    request: Request
    ctx: RequestContext
    secret: bytes
    grant: cookies.Grant | None = None
    form: dict[str, str] = field(default_factory=dict)

    @property
    def csrf(self) -> str:
        return cookies.csrf_token(self.secret, self.grant.nonce) if self.grant else ""

    def may(self, name: str) -> bool:
        """Would casbin allow this caller the console page `name`? (For links only: the
        page itself decides again.)"""
        return self.ctx.may(*CONSOLE_PERMISSIONS[name])

    def field(self, name: str, default: str = "") -> str:
        return self.form.get(name, default).strip()


def secret_of(state: AppState) -> bytes:
    return cookies.console_secret(state.url_signing_secret)


def _authorize(state: AppState, principal: Principal, name: str) -> None:
    permission = CONSOLE_PERMISSIONS.get(name)
    if permission is None:
        raise Forbidden(f"no policy decision is defined for the console page {name}")
    state.authorizer.authorize(principal.id, principal.role, *permission)


def live_key(session: Session, key_id: str) -> tuple[Principal, ApiKey]:
    """The key a session names, only while it is still active and unexpired."""
    key = session.get(ApiKey, key_id)
    if key is None or key.status != "active":
        raise cookies.SessionInvalid("the API key of this console session is no longer "
                                     "active (revoked?): sign in again")
    if key.expires_at is not None and as_utc(key.expires_at) <= utcnow():
        raise cookies.SessionInvalid("the API key of this console session has expired")
    principal = session.get(Principal, key.principal_id)
    if principal is None:
        raise cookies.SessionInvalid("the API key of this console session is unknown")
    return principal, key


def open_session(request: Request, name: str) -> Page:
    """A signed-in page: cookie → live key → principal, then `console, use` and the
    page's permission. Any refusal is counted as an anonymous call of the address."""
    state = app_state(request)
    secret = secret_of(state)
    check_path(request)
    with transaction(state.read_factory) as session:
        try:
            grant = cookies.verify(secret, request.cookies.get(cookies.COOKIE))
            principal, key = live_key(session, grant.key_id)
        except cookies.SessionInvalid:
            state.rate_limiter.hit("anonymous", client_address(request))
            raise
        session.expunge(principal)
        scopes = effective(state.scope_defaults, key.scopes)
        state.authorizer.ensure_current(session)
    request.state.principal, request.state.api_key_id = principal, key.id
    state.rate_limiter.hit("per_person", principal.id)  # shared by all the person's keys
    state.authorizer.authorize(principal.id, principal.role, *CONSOLE_USE)
    _authorize(state, principal, name)
    setattr(request.state, CALLER_CHECKED, True)
    ctx = RequestContext(state=state, request_id=request.state.request_id, principal=principal,
                         event_type=route_event(request), scopes=scopes, api_key_id=key.id)
    return Page(request=request, ctx=ctx, secret=secret, grant=grant)


def open_public(request: Request, name: str) -> Page:
    """The sign-in form: the anonymous principal, and casbin still decides."""
    state = app_state(request)
    check_path(request)
    ctx = anonymous_context(request, lambda anonymous: _authorize(state, anonymous, name))
    return Page(request=request, ctx=ctx, secret=secret_of(state))


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form (bounded like every body), the first value of each field."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != FORM_TYPE:
        raise Unprocessable(f"send the form as {FORM_TYPE} (got {kind or 'no content type'})")
    raw = await read_body(request)
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unprocessable(f"the form is malformed: {exc}") from exc
    return {name: values[0] for name, values in fields.items()}


def check_csrf(page: Page) -> None:
    """Every POST carries its session's (or its sign-in form's) token, or changes nothing."""
    nonce: str | None = page.grant.nonce if page.grant else None
    purpose = "session" if page.grant else "login"
    if page.grant is None:
        nonce = page.request.cookies.get(cookies.LOGIN_COOKIE)
    if not cookies.csrf_ok(page.secret, nonce, page.form.get(CSRF_FIELD), purpose):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and "
                        "submit it again")
