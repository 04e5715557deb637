"""Helpers for the console tests: signing in over plain HTTP, reading a form's CSRF token,
filing an access request, and the audit rows a request left."""

from __future__ import annotations

import re
import uuid

import httpx
from sqlalchemy import func, select

from audit.db import transaction
from audit.models import AccessRequest, AuditEntry

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def client(server) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, follow_redirects=False, timeout=30)


def sign_in(server, key: str) -> tuple[httpx.Client, httpx.Response]:
    """A client holding the console session of `key`, and the sign-in's response."""
    http = client(server)
    form = http.get("/console/login")
    assert form.status_code == 200, form.text
    resp = http.post("/console/login", data={"api_key": key, "csrf_token": csrf_of(form.text)})
    return http, resp


def signed_in(server, key: str) -> httpx.Client:
    http, resp = sign_in(server, key)
    assert resp.status_code == 303 and resp.headers["location"] == "/console", resp.text
    return http


def file_access_request(server) -> str:
    resp = httpx.post(f"{server.base_url}/api/v1/access_requests", timeout=30, json={
        "name": f"applicant-{uuid.uuid4().hex[:8]}", "contact": "applicant@example.org",
        "purpose": "fine-tune a small model on public-domain poetry"})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["request_id"])


def request_status(server, request_id: str) -> str:
    with transaction(server.state.read_factory) as session:
        return str(session.get(AccessRequest, request_id).status)


def audit_count(server) -> int:
    with transaction(server.state.read_factory) as session:
        return int(session.scalar(select(func.count()).select_from(AuditEntry)) or 0)


def audit_rows(server, request_id: str) -> list[AuditEntry]:
    with transaction(server.state.read_factory) as session:
        return list(session.scalars(select(AuditEntry).where(
            AuditEntry.request_id == request_id).order_by(AuditEntry.seq)))
