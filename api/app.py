"""The FastAPI app: /api/v1 (jobs, models, health, cluster, me, tokens), OpenAPI at /docs (Swagger UI, vendored).

`create_app()` starts the embedded runtime (store, Ray, dispatcher) with the server and stops it
on exit; tests and embedders may pass a runtime they manage themselves. `auth` is fixed when the app is
made (LADLE_AUTH and the bind address, see Settings.auth_for; unknown bind address: on). With auth off
only loopback Host names are served, so that a web page cannot reach a laptop's server by DNS rebinding.
"""

from __future__ import annotations

import asyncio
import gc
import re
from contextlib import asynccontextmanager

from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from api.hardening import BodyLimit, SecurityHeaders, StreamSlots, add_docs, server_error, validation_error
from api.routes import health, jobs, me, models, tokens, uploads
from service.runtime import ApiRuntime, Runtime
from service.settings import get_settings
from workers.models import torchvision_names

API_PREFIX = "/api/v1"
DASHBOARD = Path(__file__).parent / "dashboard"      # static: index.html, app.js, vendored libraries


class RefuseNul:
    """No id, name or filter may contain a NUL character (PostgreSQL text cannot hold one): 422.
    A plain ASGI middleware, so that it costs nothing on the hot path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            where = ("path" if "\x00" in unquote(scope.get("path", "")) else
                     "query" if b"%00" in scope.get("query_string", b"") else None)
            if where is not None:          # shaped as every other 422 (a validation error naming where)
                response = JSONResponse({"detail": [{"loc": [where], "msg": "the URL contains a NUL character",
                                                     "type": "value_error"}]}, status_code=422)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class LoopbackHostOnly:
    """With auth off: a request whose Host is not localhost, 127.0.0.1 or [::1] (any port) gets 400. A page
    on evil.example whose name an attacker re-points at 127.0.0.1 (DNS rebinding) sends its own name as Host.
    A plain ASGI middleware, like RefuseNul."""

    HOST = re.compile(r"(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?", re.IGNORECASE)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if self.HOST.fullmatch(host) is None:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                shown = host if len(host) <= 100 else host[:100] + "..."
                response = JSONResponse({"detail": f"Host {shown!r} is not served: with auth off this server answers "
                                                   "only to localhost, 127.0.0.1 and [::1] (turn auth on with "
                                                   "LADLE_AUTH=on to serve other names)"}, status_code=400)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def document_spec_body(app: FastAPI) -> None:
    """POST /jobs reads its body itself (off the event loop); its OpenAPI entry refers to JobSpec, whose
    schema (and its parts') this adds to the document's components."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            default().setdefault("components", {}).setdefault("schemas", {}).update(jobs.spec_schemas())
        return app.openapi_schema

    app.openapi = openapi


def create_app(runtime: Runtime | None = None, *, auth: bool | None = None, api_only: bool = False) -> FastAPI:
    """`auth`: whether bearer tokens are asked for; None: from the settings (runtime's, else LADLE_*) with
    the bind address unknown, so LADLE_AUTH=auto means on. Without `runtime` the app starts its own with
    the server: the embedded one, or with `api_only` an ApiRuntime (an API process of `ladle serve
    --workers N`, whose control process runs the embedded one)."""
    if auth is None:
        auth = (runtime.settings if runtime is not None else get_settings()).auth_for(None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or (ApiRuntime() if api_only else Runtime())
        if runtime is None:
            await asyncio.to_thread(rt.start)
            # a spec naming a torchvision model lists torchvision's models; importing torchvision takes
            # seconds: do it now, off the event loop and before serving, not inside the first such request
            # (nor beside the first requests: what it makes must be there before the freeze below)
            await asyncio.to_thread(torchvision_names)
            gc.collect()            # start-up's garbage goes before the freeze below (once: ~0.2 s)
        app.state.runtime = rt
        # What start-up made (torch, torchvision, Ray, the app) lives as long as the server: keep it out of
        # the garbage collector's full passes, which otherwise stall every request in flight (seen: 170 ms
        # pauses; 0.5 s on a busy machine when torchvision was imported after the freeze)
        gc.freeze()
        try:
            yield
        finally:
            if runtime is None:
                await asyncio.to_thread(rt.stop)

    app = FastAPI(title="Ladle", version="0.1.0", lifespan=lifespan, openapi_url=f"{API_PREFIX}/openapi.json",
                  docs_url=None, redoc_url=None, description="Prune neural networks and retrain them as Sparse Model Soups.")
    app.state.auth = auth
    app.add_middleware(RefuseNul)
    settings = runtime.settings if runtime is not None else get_settings()
    app.add_middleware(BodyLimit, settings=settings, uploads=f"{API_PREFIX}/uploads")
    if not auth:
        app.add_middleware(LoopbackHostOnly)        # before the body is read
    # the last added runs first: headers go on every response, the 400, 413 and RefuseNul's 422 included
    app.add_middleware(SecurityHeaders)
    app.add_exception_handler(Exception, server_error)      # a 500 has them too
    app.add_exception_handler(RequestValidationError, validation_error)
    app.state.streams = StreamSlots(settings.home / "streams")
    add_docs(app, app.openapi_url)
    document_spec_body(app)
    api = APIRouter(prefix=API_PREFIX)
    for module in (jobs, models, uploads, health, me, tokens):
        api.include_router(module.router)
    app.include_router(api)
    app.mount("/dashboard", StaticFiles(directory=DASHBOARD), name="dashboard")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html")

    return app
