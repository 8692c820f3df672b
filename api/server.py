"""uvicorn as Ladle runs it (`uvicorn_config`: time and size limits from the settings); the app of each
API process of `ladle serve --workers N` (`worker_app`); and the API server in a background thread with
the embedded runtime: for `ladle demo` and for tests that need a live server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import httpx
import uvicorn
from uvicorn._subprocess import get_subprocess
from uvicorn.config import STARTUP_FAILURE

from api.app import create_app
from service.cluster import free_ports
from service.runtime import Runtime
from service.settings import Settings, get_settings

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:                   # no httptools: uvicorn's h11 parser, without a header timeout
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:
    class HeaderLimitedProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with what it lacks: a client must send each request's headers
        within `header_seconds` of connecting (or of the request's first byte, on a kept-alive
        connection) and in at most `max_header_bytes`; else the connection is answered 408 or 431 and
        closed. (uvicorn's timeout_keep_alive only covers the idle time between requests.)"""
        header_seconds = 10.0
        max_header_bytes = 64 * 1024

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.header_timer: asyncio.TimerHandle | None = None
            self.header_bytes = 0

        def _wait_for_headers(self) -> None:
            if self.header_timer is None:
                self.header_bytes = 0
                self.header_timer = self.loop.call_later(self.header_seconds, self._refuse, 408, b"Request Timeout")

        def _headers_done(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _refuse(self, code: int, reason: bytes) -> None:
            self._headers_done()
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 %d %s\r\nconnection: close\r\ncontent-length: 0\r\n\r\n" % (code, reason))
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.header_timer is not None:              # still in a request's headers
                self.header_bytes += len(data)
                if self.header_bytes > self.max_header_bytes:
                    self._refuse(431, b"Request Header Fields Too Large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._wait_for_headers()

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()


if HttpToolsProtocol is not None:
    class WorkerHttpProtocol(HeaderLimitedProtocol):
        """HeaderLimitedProtocol with its limits from this process's settings (LADLE_*): what uvicorn's
        worker processes import by name (a class made at run time cannot be sent to them)."""

        def __init__(self, *args: Any, **kwargs: Any):
            s = get_settings()
            self.header_seconds, self.max_header_bytes = s.http_header_seconds, s.http_max_header_bytes
            super().__init__(*args, **kwargs)


def uvicorn_config(app: Any, settings: Settings, *, workers: int = 1, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's Config with Ladle's limits (LADLE_HTTP_*): idle keep-alive, header time and size,
    connections at once (per process), and how long open requests (event streams) may take to end on
    shutdown. `workers` > 1: `app` is ignored; each API process (ApiProcesses) makes its own
    (`worker_app`) and reads the limits from its environment, which it inherits."""
    if workers > 1:
        app, kwargs["factory"] = f"{__name__}:worker_app", True
    if HttpToolsProtocol is None:
        http: Any = "h11"
    elif workers > 1:
        http = f"{__name__}:WorkerHttpProtocol"
    else:
        http = type("LadleHttpProtocol", (HeaderLimitedProtocol,), {
            "header_seconds": settings.http_header_seconds, "max_header_bytes": settings.http_max_header_bytes})
    return uvicorn.Config(app, http=http, timeout_keep_alive=settings.http_keep_alive_seconds,
                          h11_max_incomplete_event_size=settings.http_max_header_bytes,
                          limit_concurrency=settings.http_max_concurrency,
                          timeout_graceful_shutdown=settings.http_shutdown_seconds, **kwargs)


PARENT_POLL = 1.0       # seconds between an API process's looks at whether its control process still runs


log = logging.getLogger("ladle.api")


def listening_sockets(host: str, port: int, n: int, backlog: int = 2048) -> list[socket.socket]:
    """`n` listening sockets on one address, one per API process, with SO_REUSEPORT: the kernel spreads new
    connections evenly over them. (One shared socket let whichever process woke first take them: 46 of 60
    connections went to one of two processes.) A port another server holds is refused first (OSError),
    never shared: a plain bind must succeed before the sockets are made. Port 0: one free port for all."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # (a port in TIME_WAIT is free)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.set_inheritable(True)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class ApiProcesses:
    """The API processes of `ladle serve --workers N`: each a uvicorn server (spawned, as uvicorn's own
    supervisor does) on a listening socket of its own on the shared port (`listening_sockets`). One that
    ends is started again, unless it could not start at all (uvicorn's exit code 3: the same would happen
    again); `run` returns when `stop` is set, and `stop()` ends them (the caller's clean-up, always)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]):
        self.config, self.sockets = config, sockets
        self.processes: list[Any] = [None] * len(sockets)

    def _start(self, i: int) -> None:
        process = get_subprocess(self.config, uvicorn.Server(self.config).run, [self.sockets[i]])
        process.start()
        self.processes[i] = process

    def run(self, stop: threading.Event) -> bool:
        """Serve until `stop` is set; False if an API process could not start (then `stop` is set too)."""
        started = True
        for i in range(len(self.sockets)):
            self._start(i)
        while not stop.wait(0.5):
            for i, process in enumerate(self.processes):
                if process.is_alive():
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("API process %s could not start; stopping", process.pid)
                    started = False
                    stop.set()
                    break
                log.warning("API process %s ended (exit code %s); starting another", process.pid, process.exitcode)
                self._start(i)
        return started

    def stop(self) -> None:
        """SIGTERM to each (a graceful stop: open requests get LADLE_HTTP_SHUTDOWN_SECONDS), SIGKILL to what
        is left 5 s after that; the sockets closed."""
        running = [p for p in self.processes if p is not None and p.is_alive()]
        for p in running:
            p.terminate()
        deadline = time.monotonic() + (self.config.timeout_graceful_shutdown or 0) + 5
        for p in running:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        for sock in self.sockets:
            sock.close()


def worker_app() -> Any:
    """The app of one API process of `ladle serve --workers N` (uvicorn's factory, called in the process):
    an ApiRuntime, auth as its control process decided (it sets LADLE_AUTH to on or off for them). The
    process stops itself (SIGTERM: a graceful stop) when its control process is gone, SIGKILL included,
    so that no API process outlives the service and holds on to its port."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="ladle-parent-watch", daemon=True).start()
    return create_app(api_only=True, auth=get_settings().auth_for(None))


class BackgroundServer:
    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int | None = None, *, auth: bool | None = None):
        """`auth`: whether the API asks for tokens; None: the runtime's LADLE_AUTH for this bind address
        (auto: off on loopback)."""
        self.runtime, self.host = runtime, host
        self.auth = runtime.settings.auth_for(host) if auth is None else auth
        self.port = port or free_ports(1)[0]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(create_app(runtime, auth=self.auth), runtime.settings, host=host, port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="ladle-api", daemon=True)

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.runtime.start()
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the API server did not answer on {self.url} within {timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=15)
        self.runtime.stop()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
