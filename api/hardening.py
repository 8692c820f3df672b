"""Web hardening (issues 15, 25): browser security headers on every response, a request body limit, /docs
served from vendored Swagger UI (no CDN), a per-user count of open event streams (across API processes),
and one JSON reader for every request body (workers.jsonsafe: finite numbers, bounded nesting) with 422s
that carry only what JSON can.

The two middlewares are plain ASGI, like api.app.RefuseNul, so that they cost next to nothing per request.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import re
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.datastructures import Headers, MutableHeaders

from service.settings import Settings
from workers.jsonsafe import JSONRefused, loads

VENDOR = "/dashboard/vendor"           # api/dashboard/vendor, served by the app's /dashboard mount

# The dashboard and /docs load scripts, styles and data from this server only: no inline script (/docs'
# one inline script is allowed by its hash, on /docs only), no style attribute or <style> element (the
# dashboard sets its dynamic styles through the DOM), images from here or data: URLs (icons in CSS).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]


class SecurityHeaders:
    """CSP, nosniff, no framing and no referrer on every response; a response that sets its own
    Content-Security-Policy (/docs) keeps it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS:
                    if name.decode() not in headers:
                        headers.raw.append((name, value))
            await send(message)
        return await self.app(scope, receive, send_with_headers)


async def server_error(request, exc: Exception) -> PlainTextResponse:
    """The 500 for an unhandled exception, with the same headers: Starlette sends it from outside the
    middlewares (and then re-raises the exception, which the server logs)."""
    return PlainTextResponse("Internal Server Error", status_code=500,
                             headers={name.decode(): value.decode() for name, value in HEADERS})


def read_json(body: bytes) -> object:
    """A request body's JSON value, read by workers.jsonsafe.loads; a 422 naming where it is refused
    (`loc` from "body"): not JSON, nested too deep, a non-finite number, a huge integer."""
    try:
        return loads(body)
    except JSONRefused as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            [{"loc": ["body", *e.loc], "msg": e.msg, "type": "value_error"}]) from None
    except ValueError as e:                 # json.JSONDecodeError, UnicodeDecodeError
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            [{"loc": ["body"], "msg": f"JSON decode error: {e}", "type": "json_invalid"}]) from None


class _SafeJSONRequest(Request):
    async def json(self) -> object:
        if not hasattr(self, "_json"):
            self._json = read_json(await self.body())
        return self._json


class SafeJSONRoute(APIRoute):
    """The route class of every router: FastAPI reads a JSON body through `read_json` (its own reader
    takes NaN and nests until it crashes)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_SafeJSONRequest(request.scope, request.receive))
        return route


def _json_safe(value: object) -> object:
    """`value` with what JSON cannot carry (NaN, infinities, bytes, other objects) as strings."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()       # a lone surrogate cannot be sent
    if value is None or isinstance(value, (int, bool)):
        return value
    return str(value)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each error's loc, msg and type (and its input and ctx, where JSON can carry them: an
    error about a NaN query value must not become a 500 while it is written)."""
    errors = _json_safe(jsonable_encoder(exc.errors()))
    return JSONResponse({"detail": errors}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


def size_text(n: int) -> str:
    """1048576 -> "1 MiB (1048576 bytes)", 400 -> "400 bytes"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit} ({n} bytes)"
    return f"{n} bytes"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE,
                         f"the request body is larger than the limit of {size_text(limit)}",
                         headers={"Connection": "close"})


class BodyLimit:
    """A request body above `settings.max_body_bytes` (an upload's: `max_upload_bytes`) gets 413 and is not read: refused from its
    Content-Length before the app runs, or (chunked, or a Content-Length that lies) as soon as the bytes
    received pass the limit. The app sees the error as an HTTPException while it reads the body (so
    nothing is stored); should it escape a route before the response started, it is answered here."""

    def __init__(self, app, settings: Settings, uploads: str | None = None):
        self.app, self.settings, self.uploads = app, settings, uploads

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["path"] == self.uploads and scope["method"] == "POST"     # streamed to the artifact store
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(BodyTooLarge(limit), scope, receive, send)
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as e:
            if started:
                raise
            await self._refuse(e, scope, receive, send)

    @staticmethod
    async def _refuse(e: BodyTooLarge, scope, receive, send):
        await JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)(scope, receive, send)


def add_docs(app: FastAPI, openapi_url: str) -> None:
    """/docs: Swagger UI from api/dashboard/vendor (the FastAPI app is made with docs_url and redoc_url
    None). Its page has one inline script, which its CSP allows by hash."""
    page = get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} API",
                               swagger_js_url=f"{VENDOR}/swagger-ui-bundle.js",
                               swagger_css_url=f"{VENDOR}/swagger-ui.css", swagger_favicon_url="data:,",
                               oauth2_redirect_url=None, swagger_ui_parameters={"validatorUrl": None})
    html = page.body.decode()
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    csp = CSP.replace("script-src 'self'", f"script-src 'self' {hashes}")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html, headers={"Content-Security-Policy": csp})


class StreamSlots:
    """Open event streams per user, counted across the API processes of one server (`ladle serve --workers
    N` on one host): a stream holds an exclusive lock (flock) on one of its user's `limit` slot files in
    `folder`, which the kernel gives back however the stream ends, its process included. `open()` gives a
    streaming response that holds a slot until it ends (the job ended, its lifetime ran out, the client
    went away, the server stops), or None when the user already holds `limit`. `held`: this process's."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.held: Counter[str | None] = Counter()

    def _slot(self, user: str | None, limit: int) -> int | None:
        """An open file descriptor holding one of the user's slots, or None if all are held."""
        self.folder.mkdir(parents=True, exist_ok=True)
        who = hashlib.sha256(b"\0" if user is None else user.encode()).hexdigest()[:32]
        for k in range(limit):
            fd = os.open(self.folder / f"{who}-{k}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                os.close(fd)
        return None

    def open(self, user: str | None, limit: int, body, **kwargs) -> StreamingResponse | None:
        fd = self._slot(user, limit)
        if fd is None:
            return None
        self.held[user] += 1
        return _Held(body, release=lambda: self._release(user, fd), **kwargs)

    def _release(self, user: str | None, fd: int) -> None:
        os.close(fd)                  # and with it the lock
        self.held[user] -= 1
        if self.held[user] <= 0:
            del self.held[user]


class _Held(StreamingResponse):
    def __init__(self, body, *, release: Callable[[], None], **kwargs):
        super().__init__(body, **kwargs)
        self.release = weakref.finalize(self, release)     # once: when sent, or if never sent, when collected

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()
