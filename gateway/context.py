"""The per-request unit of work: who is calling, their database session, and the audit
entry the request will leave.

`RequestContext` is a FastAPI dependency (function scope, so its teardown runs before
the response is sent): it authenticates the key on a read-only session, hands the
handler a lazily opened write session, and on success appends the request's audit row
and commits both together. On failure it rolls back; the error handler
(gateway.app) then commits a single denial row on its own. The caller is authenticated,
rate-limited (gateway.ratelimit) and authorized before the body is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session

from audit import log as audit_log
from audit.db import transaction
from audit.models import ApiKey, Principal
from gateway import downloads
from gateway.bodies import CALLER_CHECKED
from gateway.bodies import JsonBody as JsonBody  # the routes' body types, re-exported
from gateway.bodies import OptionalJsonBody as OptionalJsonBody
from gateway.errors import BadRequest, Forbidden, Unprocessable
from gateway.permissions import ROUTE_PERMISSIONS
from gateway.state import AppState
from policy.errors import KeyRejected
from policy.keys import authenticate, authenticate_key_id
from policy.scopes import Scopes, effective

M = TypeVar("M", bound=BaseModel)
ANONYMOUS = "anonymous"


def app_state(request: Request) -> AppState:
    return request.app.state.loragate  # type: ignore[no-any-return]


def route_event(request: Request) -> str:
    route = request.scope.get("route")
    return f"api.{getattr(route, 'name', None) or request.url.path}"


@dataclass
class RequestContext:
    state: AppState
    request_id: str
    principal: Principal
    event_type: str
    scopes: Scopes
    api_key_id: str | None = None  # None only for the anonymous routes
    subject: str = ""
    audit_payload: dict[str, Any] = field(default_factory=dict)
    after_commit: list[Callable[[], object]] = field(default_factory=list)
    _session: Session | None = None

    @property
    def session(self) -> Session:
        """The request's write session, opened on first use (long polls never hold one)."""
        if self._session is None:
            self._session = self.state.factory()
        return self._session

    def may(self, resource: str, action: str) -> bool:
        """A policy decision beyond the route's own (e.g. reading other principals' records)."""
        return self.state.authorizer.allows(self.principal.id, self.principal.role, resource,
                                            action)

    def note(self, subject: str | None = None, **payload: Any) -> None:
        """Add ids, decisions and hashes to this request's audit entry (never raw text)."""
        if subject is not None:
            self.subject = subject
        self.audit_payload.update(payload)

    def _commit(self) -> None:
        payload = {**self.audit_payload, "api_key_id": self.api_key_id,
                   "policy_version": self.state.authorizer.version}
        audit_log.append(self.session, actor=self.principal.id, event_type=self.event_type,
                         decision="allow", subject=self.subject, request_id=self.request_id,
                         payload=payload)
        self.session.commit()

    def _close(self, ok: bool) -> None:
        if self._session is not None:
            if not ok:
                self._session.rollback()
            self._session.close()


def request_context(request: Request) -> Iterator[RequestContext]:
    """Authenticate (a refused key counts as an anonymous call of the client's address),
    count the call against its key's rate limit, and authorize the route — all before
    anything reads the request body (gateway.bodies)."""
    state = app_state(request)
    check_path(request)
    with transaction(state.read_factory) as session:
        try:
            principal, key = authenticate(session, request.headers.get("x-api-key"))
        except KeyRejected:
            state.rate_limiter.hit("anonymous", client_address(request))
            raise
        session.expunge(principal)
        scopes = effective(state.scope_defaults, key.scopes)
        key_id = key.id
        state.authorizer.ensure_current(session)
    yield from _unit_of_work(_keyed_context(request, principal, key_id, scopes))


def _keyed_context(request: Request, principal: Principal, key_id: str,
                   scopes: Scopes) -> RequestContext:
    """The context of a caller known by an API key: rate-limited per person, then casbin."""
    state = app_state(request)
    request.state.principal, request.state.api_key_id = principal, key_id
    state.rate_limiter.hit("per_person", principal.id)  # all of a person's keys share it
    _authorize(state, request, principal)
    setattr(request.state, CALLER_CHECKED, True)
    return RequestContext(state=state, request_id=request.state.request_id,
                          principal=principal, event_type=route_event(request), scopes=scopes,
                          api_key_id=key_id)


def _unit_of_work(ctx: RequestContext) -> Iterator[RequestContext]:
    """Hand out the context; on success append the audit row and commit, else roll back.
    After-commit callbacks (waking the worker, deleting files) run only after a commit."""
    ok = False
    try:
        yield ctx
        ctx._commit()
        ok = True
    finally:
        ctx._close(ok)
    for callback in ctx.after_commit:
        callback()


def public_request_context(request: Request) -> Iterator[RequestContext]:
    """For the few routes callers use before they have a key (requesting access, claiming
    a key): the caller is the anonymous principal, and casbin still decides."""
    state = app_state(request)
    state.rate_limiter.hit("access_requests", client_address(request))
    ctx = anonymous_context(request, lambda anonymous: _authorize(state, request, anonymous))
    yield from _unit_of_work(ctx)


def anonymous_context(request: Request,
                      authorize: Callable[[Principal], None]) -> RequestContext:
    """The anonymous principal's context, once `authorize` (a casbin decision on the current
    policy) has let it through."""
    state = app_state(request)
    anonymous = Principal(id=ANONYMOUS, name=ANONYMOUS, role=ANONYMOUS)
    with transaction(state.read_factory) as session:
        state.authorizer.ensure_current(session)
    authorize(anonymous)
    setattr(request.state, CALLER_CHECKED, True)
    return RequestContext(state=state, request_id=request.state.request_id,
                          principal=anonymous, event_type=route_event(request),
                          scopes=state.scope_defaults)


def link_request_context(request: Request) -> Iterator[RequestContext]:
    """For the external-weights link route: with an X-API-Key it is `request_context` (and
    the route still holds the link to `link_issuer`). Without one the signed link is the
    credential (gateway.downloads): its MAC and expiry are checked before anything else is
    read, then the API key that asked for it must still be usable (`link_issuer`). The caller
    is that principal, with that key: its person's rate limit, a casbin decision for its
    role, and the audit row are theirs. A link refused here counts as an anonymous call of
    the client's address."""
    if request.headers.get("x-api-key") is not None:
        yield from request_context(request)
        return
    state = app_state(request)
    check_path(request)
    try:
        link = downloads.verify(state.url_signing_secret,
                                str(request.path_params.get("token", "")),
                                max_lifetime=state.settings.external_url_seconds)
        with transaction(state.read_factory) as session:
            principal, key = link_issuer(session, link)
            session.expunge(principal)
            scopes = effective(state.scope_defaults, key.scopes)
            key_id = key.id
            state.authorizer.ensure_current(session)
    except downloads.LinkError as exc:
        state.rate_limiter.hit("anonymous", client_address(request))
        raise Forbidden(str(exc)) from exc
    ctx = _keyed_context(request, principal, key_id, scopes)
    ctx.note(credential="signed_link")
    yield from _unit_of_work(ctx)


def link_issuer(session: Session, link: downloads.Link) -> tuple[Principal, ApiKey]:
    """The principal and API key that asked for `link`, while that key is usable (not
    revoked, not expired) and belongs to the principal the link names; else LinkError.
    Whatever key presents a link, it is honoured only while its issuing key is."""
    if not link.key_id:
        raise downloads.LinkError("this download link names no API key that asked for it; "
                                  "ask for new URLs with get_external_weights_urls")
    try:
        principal, key = authenticate_key_id(session, link.key_id)
    except KeyRejected as exc:
        raise downloads.LinkError(f"the API key that asked for this download link can no "
                                  f"longer be used: {exc}") from exc
    if principal.id != link.principal_id:  # only a forged link; checked anyway
        raise downloads.LinkError("this download link's key and principal disagree")
    return principal, key


def audit_path(request: Request) -> str:
    """The request path as a refusal's audit row records it. A download link is a bearer
    credential, so its token is recorded only as a digest (the allowed fetch's row names
    the same `link_sha256`)."""
    token = request.path_params.get("token")
    if isinstance(token, str) and route_event(request) == "api.download_external_weights":
        return request.url.path.replace(token, "sha256:" + link_digest(token))
    return request.url.path


def link_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_path(request: Request) -> None:
    """Ids in the path are looked up in the database; one with a NUL is never valid."""
    if "\x00" in request.url.path:
        raise BadRequest("the request path contains a NUL character")


def client_address(request: Request) -> str:
    """The peer address the rate limits count by (a proxy in front must be trusted to
    pass a distinct connection per client; forwarded headers are not believed)."""
    return request.client.host if request.client else "unknown"


def _authorize(state: AppState, request: Request, principal: Principal) -> None:
    """casbin decides every route; a route with no declared permission is refused."""
    name = getattr(request.scope.get("route"), "name", None)
    permission = ROUTE_PERMISSIONS.get(name or "")
    if permission is None:
        raise Forbidden(f"no policy decision is defined for {request.url.path}")
    state.authorizer.authorize(principal.id, principal.role, *permission)


Ctx = Annotated[RequestContext, Depends(request_context, scope="function")]
PublicCtx = Annotated[RequestContext, Depends(public_request_context, scope="function")]
LinkCtx = Annotated[RequestContext, Depends(link_request_context, scope="function")]


def parse(model: type[M], body: Any) -> M:
    """Validate a JSON body with the SDK's own request model; a 422 says what is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise Unprocessable(f"invalid {model.__name__}: {where}: {err.get('msg')}") from exc


def load_json_text(value: str | None) -> Any:
    return json.loads(value) if value else None
