"""The Prefect server's ASGI app behind a Host and Origin guard (``sparseflow server``,
``sparseflow with-server``).

Bound to 127.0.0.1, Prefect's server is still reachable from any web page open in the user's
browser: by default it answers CORS preflights from every origin
(``access-control-allow-origin: *``) and any ``Host`` header, so a page can create and delete
flows and deployments (a cross-site request), or reach the server through DNS rebinding (a
foreign name resolving to 127.0.0.1, sent as ``Host``). Prefect has settings for CORS, none for
the Host header, so this module wraps Prefect's own app (``prefect.server.api.server.create_app``,
what ``prefect server start`` serves) in a guard that refuses:

- a request whose ``Host`` is not one of the server's own names (400), and
- a request whose ``Origin`` is present and not one of the server's own origins (403), before
  Prefect sees it: a "simple" cross-site POST needs no preflight, so CORS headers alone would
  not stop it.

and sets Prefect's ``PREFECT_SERVER_CORS_ALLOWED_ORIGINS`` to the same origins. Prefect's own API
authentication (``PREFECT_SERVER_API_AUTH_STRING`` on the server, ``PREFECT_API_AUTH_STRING``
on clients and workers) is passed through unchanged. The allowed names come from the
environment that :func:`flows.server.guarded_server_command` sets: :data:`HOSTS_ENV` (comma
separated ``host`` or ``host:port``) and :data:`ORIGINS_ENV` (comma separated origins); add the
name of a reverse proxy there.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable

HOSTS_ENV = "SPARSEFLOW_SERVER_ALLOWED_HOSTS"
ORIGINS_ENV = "SPARSEFLOW_SERVER_ALLOWED_ORIGINS"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed_names(host: str, port: int) -> tuple[list[str], list[str]]:
    """The ``Host`` values and origins of a server bound to ``host:port``: the address itself,
    and for a loopback address also ``localhost`` and ``127.0.0.1`` (what a browser and the
    Prefect client send)."""
    names = {host}
    if host in ("127.0.0.1", "localhost", "::1"):
        names |= {"127.0.0.1", "localhost"}
    hosts = sorted({f"{n}:{port}" for n in names} | names)
    origins = sorted(f"http://{n}:{port}" for n in names)
    return hosts, origins


class HostOriginGuard:
    """ASGI middleware: refuse requests (HTTP and websocket) with a foreign ``Host`` (400) or a
    foreign ``Origin`` (403); pass the rest to ``app`` unchanged."""

    def __init__(self, app: Callable[..., Awaitable[None]], hosts: list[str], origins: list[str]):
        self.app, self.hosts, self.origins = app, {h.lower() for h in hosts}, {o.lower() for o in origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            host = headers.get("host", "").lower()
            origin = headers.get("origin")
            if host not in self.hosts:
                return await self._refuse(scope, send, 400, f"Host {host!r} is not this server's; allowed: {sorted(self.hosts)}")
            if origin is not None and origin.lower() not in self.origins:
                return await self._refuse(scope, send, 403, f"Origin {origin!r} may not use this server")
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, message: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = message.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def create_app() -> HostOriginGuard:
    """Prefect's full server app (API, UI, services) inside :class:`HostOriginGuard`; the
    ``uvicorn --factory`` entry point of :func:`flows.server.guarded_server_command`."""
    from prefect.server.api.server import create_app as prefect_app

    hosts = [h for h in os.environ.get(HOSTS_ENV, "").split(",") if h]
    origins = [o for o in os.environ.get(ORIGINS_ENV, "").split(",") if o]
    if not hosts:
        raise RuntimeError(f"{HOSTS_ENV} is not set; start the server with `sparseflow server`")
    return HostOriginGuard(prefect_app(final=True), hosts, origins)
