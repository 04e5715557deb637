"""HTML out: the console's Jinja2 templates, its response headers, and how a refused or
failed console request is shown (the refusal's audit row is written by gateway.app first).

Autoescaping is on for every template. Pages are never cached and never framed, and their
Content-Security-Policy allows scripts only from the console itself (the vendored htmx).
A request made by htmx (`HX-Request`) gets a fragment, any other a whole page, so every
form also works without JavaScript. Must not query the database or decide anything.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from gateway.console import session as cookies
from gateway.console.context import secret_of

PREFIX = "/console"
LOGIN_PATH = f"{PREFIX}/login"
HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'"),
}

_env = Environment(loader=PackageLoader("gateway.console", "templates"),
                   autoescape=select_autoescape(["html"]), undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def html(template: str, http_status: int = 200, **values: Any) -> HTMLResponse:
    body = _env.get_template(template).render(**values)
    return HTMLResponse(body, status_code=http_status, headers=HEADERS)


def redirect(path: str) -> Response:
    return RedirectResponse(path, status_code=303, headers=HEADERS)


def set_cookie(response: Response, request: Request, name: str, value: str,
               max_age: int) -> None:
    """HttpOnly, SameSite=Strict, scoped to the console; Secure when served over HTTPS."""
    response.set_cookie(name, value, max_age=max_age, path=PREFIX, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def clear_cookie(response: Response, request: Request, name: str) -> None:
    response.delete_cookie(name, path=PREFIX, httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")


def login_page(request: Request, message: str = "", status: int = 200) -> Response:
    """The sign-in form, with a fresh CSRF nonce for it (kept in its own cookie)."""
    nonce = cookies.new_nonce()
    token = cookies.csrf_token(secret_of(request.app.state.loragate), nonce, "login")
    response = html("login.html", status, message=message, csrf=token, user=None)
    set_cookie(response, request, cookies.LOGIN_COOKIE, nonce, cookies.LOGIN_FORM_SECONDS)
    return response


def is_console(request: Request) -> bool:
    path = request.url.path
    return path == PREFIX or path.startswith(f"{PREFIX}/")


def error_response(request: Request, status: int, message: str, request_id: str
                   ) -> Response:
    """A refused console request as HTML: no session → the sign-in form (a failed sign-in
    says why); anything else → the refusal's status and message, as a page or fragment."""
    name = getattr(request.scope.get("route"), "name", None)
    if status == 401 and name == "console_login":
        return login_page(request, message, status)
    if status == 401:
        return _to_login(request, message)
    values = {"status": status, "message": message, "request_id": request_id}
    if is_htmx(request):
        return html("_refusal.html", status, **values)
    return html("error.html", status, user=None, **values)


def _to_login(request: Request, message: str) -> Response:
    target = f"{LOGIN_PATH}?{urlencode({'why': message})}"
    if is_htmx(request):
        response: Response = Response(status_code=401, headers={**HEADERS,
                                                                "HX-Redirect": target})
    else:
        response = redirect(target)
    clear_cookie(response, request, cookies.COOKIE)
    return response
