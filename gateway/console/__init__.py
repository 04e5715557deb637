"""The auditor/admin console: server-rendered pages at /console (Jinja2, with the vendored
htmx for in-place fragments; every form also works without JavaScript).

It owns no rules of its own: pages make the API's casbin decisions
(gateway.console.permissions), call the same services, and leave the same audit rows.
`install` adds its routes and its static files (htmx.min.js, the stylesheet: the only
console paths served without a session or an audit row) to the app; gateway.app shows a
refused console request through `error_response`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from gateway.console.pages import ROUTES
from gateway.console.render import error_response, is_console

STATIC_DIR = Path(__file__).with_name("static")

__all__ = ["ROUTES", "error_response", "install", "is_console"]


def install(app: FastAPI) -> None:
    app.router.routes.extend(ROUTES)
    app.mount("/console/static", StaticFiles(directory=STATIC_DIR), name="console_static")
