"""The API server in a background thread (uvicorn), with the embedded runtime: for `ladle demo`
and for tests that need a live server."""

from __future__ import annotations

import threading
import time

import httpx
import uvicorn

from api.app import create_app
from service.cluster import free_ports
from service.runtime import Runtime


class BackgroundServer:
    def __init__(self, runtime: Runtime, host: str = "127.0.0.1", port: int | None = None, *, auth: bool | None = None):
        """`auth`: whether the API asks for tokens; None: the runtime's LADLE_AUTH for this bind address
        (auto: off on loopback)."""
        self.runtime, self.host = runtime, host
        self.auth = runtime.settings.auth_for(host) if auth is None else auth
        self.port = port or free_ports(1)[0]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(runtime, auth=self.auth), host=host, port=self.port,
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
