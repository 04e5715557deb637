"""Console routes: each page handler wrapped in the console's context and unit of work.

Owns the order every console request follows: caller and permissions first
(gateway.console.context), then — for a POST — the bounded form and its CSRF token, then
the handler (plain, synchronous: parse, call services, render) in the thread pool, then
the API's unit of work appends the audit row and commits (or rolls back on any error,
which gateway.app then audits and gateway.console.render shows as a page).

Console routes are Starlette routes, not FastAPI `APIRoute`s: they speak HTML and
cookies, not the API's JSON and `X-API-Key`, and their decisions are declared in
gateway.console.permissions. Must not hold business rules or SQL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from gateway.console.context import Page, check_csrf, open_public, open_session, read_form
from gateway.console.permissions import PUBLIC_ROUTES
from gateway.context import _unit_of_work

Handler = Callable[[Page], Response]


class ConsoleRoute(Route):
    """A Starlette route that puts itself on the scope, as FastAPI's routes do, so audit
    rows (`api.<name>`) and the metrics (its path template) name it."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child


def page(path: str, name: str, handler: Handler, methods: Sequence[str] = ("GET",)
         ) -> ConsoleRoute:
    async def endpoint(request: Request) -> Response:
        return await serve(request, name, handler)

    return ConsoleRoute(path, endpoint, methods=list(methods), name=name)


async def serve(request: Request, name: str, handler: Handler) -> Response:
    opener = open_public if name in PUBLIC_ROUTES else open_session
    current = await run_in_threadpool(opener, request, name)
    unit = contextmanager(_unit_of_work)(current.ctx)
    await run_in_threadpool(unit.__enter__)
    try:
        if request.method == "POST":
            current.form = await read_form(request)
            check_csrf(current)
        response = await run_in_threadpool(handler, current)
    except BaseException as exc:
        await run_in_threadpool(_exit, unit, exc)
        raise
    await run_in_threadpool(_exit, unit, None)
    return response


def _exit(unit: Any, exc: BaseException | None) -> None:
    """Leave the unit of work: commit with its audit row, or roll back on `exc`."""
    if exc is None:
        unit.__exit__(None, None, None)
    else:
        unit.__exit__(type(exc), exc, exc.__traceback__)
