"""The console's pages: parse the request, call the services, render.

Sign-in and out; the audit search with the trail's verification and per-entry inclusion
proofs; access requests and release overrides with their decisions (the services enforce
the rules — pending only, the two-person independence of an override — and their refusal
is what the page shows); training runs with their screening tallies; release reports with
a plot of base vs adapter per suite.

Each handler runs inside the console's context (gateway.console.routing): the caller is
known and allowed, a POST's CSRF token is checked, and the unit of work commits the
changes with the request's audit row after the handler returns. Handlers never commit.
Must not hold business rules (policy, evals) or SQL (gateway.console.views).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from audit.models import ACCESS_REQUEST_STATES, ROLES, Checkpoint, ReleaseOverride
from evals import overrides
from evals.release import ReleaseRefused
from gateway.console import plot, render, views
from gateway.console import session as cookies
from gateway.console.context import Page, secret_of
from gateway.console.routing import ConsoleRoute, page
from gateway.context import client_address
from gateway.errors import BadRequest, NotFound
from gateway.ownership import reads_all
from policy import access
from policy.errors import KeyRejected
from policy.keys import authenticate

OVERRIDE_STATES = ("pending", "approved", "cancelled")
NAV = (("console_audit", "/console/audit", "Audit log"),
       ("console_access_requests", "/console/access_requests", "Access requests"),
       ("console_overrides", "/console/overrides", "Overrides"),
       ("console_runs", "/console/runs", "Training runs"),
       ("console_releases", "/console/releases", "Releases"))


def show(p: Page, template: str, **values: Any) -> Response:
    """A whole page, with the navigation this caller's permissions allow."""
    nav = [(href, label) for name, href, label in NAV if p.may(name)]
    return render.html(template, user=p.ctx.principal, csrf=p.csrf, nav=nav, **values)


def outcome(p: Page, message: str, back: str) -> Response:
    """What a decision did: a fragment in place of its form, or a page linking back."""
    if render.is_htmx(p.request):
        return render.html("_outcome.html", message=message)
    return show(p, "outcome.html", message=message, back=back)


def _int(value: str, name: str, minimum: int = 0) -> int:
    if not value.strip().lstrip("-").isdigit() or int(value) < minimum:
        raise BadRequest(f"{name} must be a whole number of at least {minimum}")
    return int(value)


def _owner_filter(p: Page) -> str | None:
    """None: everyone's records (the policy's `records, read_all`); else the caller's."""
    return None if reads_all(p.ctx) else p.ctx.principal.id


# -- sign-in -----------------------------------------------------------------------------

def login_form(p: Page) -> Response:
    return render.login_page(p.request, p.request.query_params.get("why", "")[:300])


def login(p: Page) -> Response:
    """An API key in, a session cookie out: the key must be valid and its role allowed
    `console, use` by the same policy the API asks."""
    state = p.ctx.state
    try:
        principal, key = authenticate(p.ctx.session, p.field("api_key"))
    except KeyRejected:
        state.rate_limiter.hit("anonymous", client_address(p.request))
        raise
    p.ctx.session.expunge(principal)  # still readable by the refusal's audit row
    p.request.state.principal, p.request.state.api_key_id = principal, key.id
    p.ctx.principal, p.ctx.api_key_id = principal, key.id
    state.authorizer.authorize(principal.id, principal.role, "console", "use")
    value, grant = cookies.issue(secret_of(state), key.id)
    p.ctx.note(subject=principal.id, session_expires=grant.expires)
    response = render.redirect("/console")
    render.set_cookie(response, p.request, cookies.COOKIE, value, cookies.SESSION_SECONDS)
    render.clear_cookie(response, p.request, cookies.LOGIN_COOKIE)
    return response


def logout(p: Page) -> Response:
    p.ctx.note(subject=p.ctx.principal.id)
    response = render.redirect(f"{render.LOGIN_PATH}?{urlencode({'why': 'signed out'})}")
    render.clear_cookie(response, p.request, cookies.COOKIE)
    return response


def home(p: Page) -> Response:
    counts = views.pending_counts(p.ctx.session) if p.may("console_access_requests") \
        else None
    return show(p, "home.html", counts=counts)


# -- the audit trail ---------------------------------------------------------------------

def audit(p: Page) -> Response:
    search = views.parse_search(dict(p.request.query_params))
    entries, older = views.find_entries(p.ctx.session, search)
    p.ctx.note(query={f"by_{k}": v for k, v in search.query_string().items()},
               returned=len(entries))
    names = views.names_of(p.ctx.session, {e["actor"] for e in entries})
    older_link = urlencode(search.query_string(before_seq=older)) if older else ""
    return show(p, "audit.html", search=search, entries=entries, names=names,
                older_link=older_link)


def audit_verify(p: Page) -> Response:
    status = views.trail_status(p.ctx.session, p.ctx.state)
    p.ctx.note(chain_ok=status.chain.ok, head_seq=status.chain.head_seq)
    if render.is_htmx(p.request):
        return render.html("_verify.html", status=status)
    return show(p, "verify.html", status=status)


def audit_proof(p: Page) -> Response:
    seq = _int(p.request.path_params["seq"], "seq", 1)
    proof = views.inclusion(p.ctx.session, p.ctx.state, seq)
    p.ctx.note(subject=str(seq), verified=proof.verified)
    if render.is_htmx(p.request):
        return render.html("_proof.html", proof=proof)
    return show(p, "proof.html", proof=proof)


# -- access requests and overrides -------------------------------------------------------

def access_requests(p: Page) -> Response:
    status = p.request.query_params.get("status", "pending")
    if status and status not in ACCESS_REQUEST_STATES:
        raise BadRequest(f"status must be one of {', '.join(ACCESS_REQUEST_STATES)}")
    rows = views.access_requests(p.ctx.session, status)
    return show(p, "access_requests.html", rows=rows, status=status,
                states=ACCESS_REQUEST_STATES, roles=ROLES,
                can_decide=p.may("console_approve_access"))


def approve_access(p: Page) -> Response:
    request_id = p.request.path_params["request_id"]
    days = p.field("expires_in_days")
    req = access.approve(p.ctx.session, request_id=request_id, actor=p.ctx.principal.id,
                         role=p.field("role", "researcher"),
                         expires_in_days=_int(days, "expires_in_days", 1) if days else None,
                         reason=p.field("reason"), defaults=p.ctx.state.scope_defaults)
    p.ctx.note(subject=request_id)
    return outcome(p, f"Approved {req.name!r} as {req.role}: they can now claim their key "
                      "with their claim token.", "/console/access_requests")


def reject_access(p: Page) -> Response:
    request_id = p.request.path_params["request_id"]
    req = access.reject(p.ctx.session, request_id=request_id, actor=p.ctx.principal.id,
                        reason=p.field("reason"))
    p.ctx.note(subject=request_id)
    return outcome(p, f"Rejected {req.name!r}: {req.decision_reason}",
                   "/console/access_requests")


def overrides_page(p: Page) -> Response:
    status = p.request.query_params.get("status", "pending")
    if status and status not in OVERRIDE_STATES:
        raise BadRequest(f"status must be one of {', '.join(OVERRIDE_STATES)}")
    rows = views.overrides(p.ctx.session, status)
    names = views.names_of(p.ctx.session, {r.requested_by for r in rows}
                           | {r.approved_by for r in rows if r.approved_by})
    return show(p, "overrides.html", rows=rows, names=names, status=status,
                states=OVERRIDE_STATES, can_decide=p.may("console_approve_override"))


def _override(p: Page) -> ReleaseOverride:
    override_id = p.request.path_params["override_id"]
    row = p.ctx.session.get(ReleaseOverride, override_id)
    if row is None:
        raise NotFound(f"override {override_id} not found")
    return row


def approve_override(p: Page) -> Response:
    """The second person's half; evals.overrides refuses the requester themself, anyone
    linked to them, and content that changed."""
    row, state = _override(p), p.ctx.state
    ckpt = overrides.approve_override(
        p.ctx.session, row, principal_id=p.ctx.principal.id, key_id=p.ctx.api_key_id,
        reason=p.field("reason"), checkpoint_root=state.settings.checkpoint_root,
        allows=state.authorizer.allows, request_id=p.ctx.request_id)
    p.ctx.note(subject=ckpt.tinker_path, override_id=row.id)
    p.ctx.after_commit.append(lambda: state.checkpoints.write(f"override:{row.id}"))
    return outcome(p, f"Override {row.id} approved: {ckpt.tinker_path} is released.",
                   "/console/overrides")


def decline_override(p: Page) -> Response:
    """Declining keeps the quarantine: the pending override is cancelled with the reason."""
    row = _override(p)
    reason = p.field("reason")
    if row.status != "pending":
        raise ReleaseRefused(f"override {row.id} is {row.status}, not pending")
    if not reason:
        raise BadRequest("declining an override needs a reason (it is kept in the audit "
                         "trail)")
    ckpt = p.ctx.session.get(Checkpoint, row.checkpoint_id)
    if ckpt is None:
        raise NotFound(f"the checkpoint of override {row.id} no longer exists")
    overrides.cancel_pending(p.ctx.session, ckpt, actor=p.ctx.principal.id,
                             reason=f"declined: {reason}", request_id=p.ctx.request_id)
    p.ctx.note(subject=ckpt.tinker_path, override_id=row.id)
    return outcome(p, f"Override {row.id} declined: {ckpt.tinker_path} stays quarantined.",
                   "/console/overrides")


# -- runs and releases -------------------------------------------------------------------

def runs(p: Page) -> Response:
    offset = _int(p.request.query_params.get("offset", "0"), "offset")
    rows, total = views.runs(p.ctx.session, _owner_filter(p), offset)
    return show(p, "runs.html", rows=rows, total=total, offset=offset,
                page_size=views.LIST_PAGE)


def releases(p: Page) -> Response:
    offset = _int(p.request.query_params.get("offset", "0"), "offset")
    rows, total = views.releases(p.ctx.session, _owner_filter(p), offset)
    return show(p, "releases.html", rows=rows, total=total, offset=offset,
                page_size=views.LIST_PAGE)


def release_report(p: Page) -> Response:
    release_id = p.request.path_params["release_id"]
    view = views.release_report(p.ctx.session, release_id, _owner_filter(p))
    p.ctx.note(subject=release_id, report_sha256=view.sha256)
    return show(p, "report.html", view=view, svg=plot.suites_svg(view.suites))


ROUTES: list[ConsoleRoute] = [
    page("/console", "console_home", home),
    page("/console/login", "console_login_form", login_form),
    page("/console/login", "console_login", login, ("POST",)),
    page("/console/logout", "console_logout", logout, ("POST",)),
    page("/console/audit", "console_audit", audit),
    page("/console/audit/verify", "console_audit_verify", audit_verify),
    page("/console/audit/{seq}/proof", "console_audit_proof", audit_proof),
    page("/console/access_requests", "console_access_requests", access_requests),
    page("/console/access_requests/{request_id}/approve", "console_approve_access",
         approve_access, ("POST",)),
    page("/console/access_requests/{request_id}/reject", "console_reject_access",
         reject_access, ("POST",)),
    page("/console/overrides", "console_overrides", overrides_page),
    page("/console/overrides/{override_id}/approve", "console_approve_override",
         approve_override, ("POST",)),
    page("/console/overrides/{override_id}/decline", "console_decline_override",
         decline_override, ("POST",)),
    page("/console/runs", "console_runs", runs),
    page("/console/releases", "console_releases", releases),
    page("/console/releases/{release_id}", "console_release_report", release_report),
]
