"""The console over plain HTTP, on SQLite and PostgreSQL: its permission table, the
session cookie (signed, HttpOnly, SameSite=Strict, never the key), the role × page
decisions (the API's casbin decisions), CSRF on every form (a POST without the session's
token is a 403 that changes nothing), keys re-checked on every request, one audit row per
request, and the audit search's filters."""

from __future__ import annotations

import time
from html import unescape

import pytest

from audit.db import transaction
from gateway.console import ROUTES
from gateway.console import session as cookies
from gateway.console.context import secret_of
from gateway.console.permissions import CONSOLE_PERMISSIONS
from gateway.console.routing import ConsoleRoute
from policy.keys import authenticate, revoke_key
from tests.console.helpers import (
    audit_rows,
    client,
    csrf_of,
    file_access_request,
    request_status,
    sign_in,
    signed_in,
)

PAGES = ["/console", "/console/audit", "/console/audit/verify", "/console/access_requests",
         "/console/overrides", "/console/runs", "/console/releases"]


@pytest.fixture(scope="module")
def keys(server) -> dict[str, str]:
    return {role: server.create_key(role=role) for role in ("admin", "auditor", "researcher")}


def test_every_console_route_declares_a_permission_and_no_entry_is_stale():
    from gateway.app import create_app

    names = {r.name for r in ROUTES}
    assert names == set(CONSOLE_PERMISSIONS)
    installed = {r.name for r in create_app().router.routes if isinstance(r, ConsoleRoute)}
    assert installed == names


def test_sign_in_sets_a_signed_httponly_strict_cookie_that_does_not_hold_the_key(server,
                                                                                 keys):
    http, resp = sign_in(server, keys["auditor"])
    assert resp.status_code == 303
    [session_cookie] = [c for c in resp.headers.get_list("set-cookie")
                        if c.startswith(f"{cookies.COOKIE}=")]
    flags = {f.strip().lower() for f in session_cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console",
            f"max-age={cookies.SESSION_SECONDS}"} <= flags
    value = http.cookies[cookies.COOKIE]
    secret = keys["auditor"].removeprefix("tml-")
    assert keys["auditor"] not in session_cookie and secret not in session_cookie
    with transaction(server.state.read_factory) as session:
        _, key = authenticate(session, keys["auditor"])
        key_id = key.id
    assert cookies.verify(secret_of(server.state), value).key_id == key_id
    assert http.get("/console").status_code == 200


def test_pages_follow_the_same_casbin_decisions_as_the_api(server, keys):
    researcher, resp = sign_in(server, keys["researcher"])
    assert resp.status_code == 403 and "role 'researcher'" in unescape(resp.text)
    assert cookies.COOKIE not in researcher.cookies  # no session for a refused role
    for role in ("auditor", "admin"):
        http = signed_in(server, keys[role])
        for path in PAGES:
            assert http.get(path).status_code == 200, (role, path)
    nobody = client(server)
    for path in PAGES:
        resp = nobody.get(path)
        assert resp.status_code == 303 and resp.headers["location"].startswith(
            "/console/login"), path


def test_a_role_without_the_decision_is_refused_and_nothing_changes(server, keys):
    request_id = file_access_request(server)
    auditor = signed_in(server, keys["auditor"])
    page = auditor.get("/console/access_requests")
    resp = auditor.post(f"/console/access_requests/{request_id}/approve",
                        data={"csrf_token": csrf_of(page.text), "role": "researcher"})
    assert resp.status_code == 403 and "policy does not allow role 'auditor'" in unescape(resp.text)
    assert request_status(server, request_id) == "pending"
    assert f'action="/console/access_requests/{request_id}/approve"' not in page.text


def test_a_post_without_the_sessions_csrf_token_is_refused_and_changes_nothing(server, keys):
    request_id = file_access_request(server)
    admin = signed_in(server, keys["admin"])
    other = signed_in(server, keys["admin"])
    token = csrf_of(admin.get("/console/access_requests").text)
    path = f"/console/access_requests/{request_id}/approve"
    for data in ({"role": "researcher"}, {"role": "researcher", "csrf_token": "forged"},
                 {"role": "researcher",
                  "csrf_token": csrf_of(other.get("/console/access_requests").text)}):
        resp = admin.post(path, data=data)
        assert resp.status_code == 403 and "CSRF" in resp.text, resp.text
        [row] = audit_rows(server, resp.headers["x-request-id"])
        assert row.decision == "deny" and row.event_type == "api.console_approve_access"
        assert request_status(server, request_id) == "pending"
    resp = admin.post(path, data={"role": "researcher", "csrf_token": token})
    assert resp.status_code == 200 and "Approved" in resp.text
    assert request_status(server, request_id) == "approved"
    # The sign-in form has its own token too.
    assert client(server).post("/console/login", data={"api_key": keys["admin"]}
                               ).status_code == 403


def test_a_revoked_key_ends_its_session_at_the_next_request(server):
    key = server.create_key(role="admin")
    http = signed_in(server, key)
    assert http.get("/console/audit").status_code == 200
    with transaction(server.state.factory) as session:
        _, row = authenticate(session, key)
        revoke_key(session, key_id=row.id, actor="test", reason="left the lab")
    resp = http.get("/console/audit")
    assert resp.status_code == 303 and "no+longer+active" in resp.headers["location"]


def test_tampered_and_expired_cookies_are_refused(server, keys):
    http = signed_in(server, keys["auditor"])
    value = http.cookies[cookies.COOKIE]
    body, _, mac = value.partition(".")
    forged = client(server)
    forged.cookies.set(cookies.COOKIE, f"{body}x.{mac}", path="/console")
    assert forged.get("/console").status_code == 303
    grant = cookies.verify(secret_of(server.state), value)
    old, _ = cookies.issue(secret_of(server.state), grant.key_id,
                           now=time.time() - cookies.SESSION_SECONDS - 1)
    expired = client(server)
    expired.cookies.set(cookies.COOKIE, old, path="/console")
    resp = expired.get("/console")
    assert resp.status_code == 303 and "expired" in resp.headers["location"]


def test_a_failed_sign_in_says_why_and_sign_out_clears_the_cookie(server, keys):
    http, resp = sign_in(server, "tml-not-a-real-key")
    assert resp.status_code == 401 and "unknown API key" in resp.text
    http = signed_in(server, keys["admin"])
    home = http.get("/console")
    resp = http.post("/console/logout", data={"csrf_token": csrf_of(home.text)})
    assert resp.status_code == 303 and resp.headers["location"].startswith("/console/login")
    assert cookies.COOKIE not in http.cookies
    assert http.get("/console").status_code == 303


def test_each_console_request_leaves_exactly_one_audit_row(server, keys):
    http = signed_in(server, keys["auditor"])
    resp = http.get("/console/audit", params={"action": "api.console_login"})
    [row] = audit_rows(server, resp.headers["x-request-id"])
    assert (row.event_type, row.decision) == ("api.console_audit", "allow")
    with transaction(server.state.read_factory) as session:
        assert row.actor == authenticate(session, keys["auditor"])[0].id
    _, resp = sign_in(server, keys["researcher"])
    [row] = audit_rows(server, resp.headers["x-request-id"])
    assert (row.event_type, row.decision) == ("api.console_login", "deny")


def test_the_audit_search_filters_by_action_actor_time_and_text(server, keys):
    name = f"searcher-{time.time_ns()}"
    key = server.create_key(owner=name, role="auditor")
    http = signed_in(server, key)
    page = http.get("/console/audit", params={"action": "api.console_login", "actor": name})
    assert page.status_code == 200 and page.text.count('class="entry"') == 1
    prefix = http.get("/console/audit", params={"action": "api.console_*", "actor": name})
    assert prefix.text.count('class="entry"') >= 2  # the sign-in and the search above
    text = http.get("/console/audit", params={"text": name})
    assert text.text.count('class="entry"') >= 1  # the key's creation names the owner
    later = http.get("/console/audit", params={"actor": name, "since": "2999-01-01"})
    assert later.text.count('class="entry"') == 0
    bad = http.get("/console/audit", params={"since": "yesterday"})
    assert bad.status_code == 400 and "ISO 8601" in bad.text
