"""What each console page asks the policy for: route name → (resource, action).

The console's pages make the same casbin decisions as the API routes that read or change
the same things (an access approval is `keys, write` here as in
`POST /api/v1/admin/access_requests/{id}/approve`). On top of its page's decision, every
page behind the sign-in also needs `console, use` (auditors and admins in the default
policy; researchers are refused). The sign-in form itself is `console, login` for the
anonymous caller. A console route without an entry here is refused (fail closed), and
`tests/console/test_console_http.py` fails when one is missing.
"""

from __future__ import annotations

from gateway.permissions import Permission

CONSOLE_USE: Permission = ("console", "use")

CONSOLE_PERMISSIONS: dict[str, Permission] = {
    # before a session exists (the anonymous principal)
    "console_login_form": ("console", "login"),
    "console_login": ("console", "login"),
    # behind the sign-in
    "console_home": CONSOLE_USE,
    "console_logout": CONSOLE_USE,
    "console_audit": ("audit", "read"),
    "console_audit_verify": ("audit", "read"),
    "console_audit_proof": ("audit", "read"),
    "console_access_requests": ("keys", "read"),
    "console_approve_access": ("keys", "write"),
    "console_reject_access": ("keys", "write"),
    "console_overrides": ("releases", "read_overrides"),
    "console_approve_override": ("releases", "override_approve"),
    "console_decline_override": ("releases", "override_approve"),
    "console_runs": ("records", "read"),
    "console_releases": ("records", "read"),
    "console_release_report": ("records", "read"),
}

# Routes that need no session (and so no `console, use`).
PUBLIC_ROUTES = frozenset({"console_login_form", "console_login"})
