"""The embedded Ray head: started by the service when no Ray address is configured, stopped on exit.

Every process binds to loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --node-ip-address 127.0.0.1)
and every port is a free one picked here: 6379, Ray's default GCS port, may belong to a Redis.
`ray start --block` runs in its own process group, so stopping it stops exactly this cluster and
never another Ray on the machine (`ray stop` would stop them all).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


def loopback_env() -> dict[str, str]:
    """Environment for the Ray nodes started here: loopback only, whatever the deployment says
    (token auth comes from the defaults the `service` package sets)."""
    return dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((LOOPBACK, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalRay:
    """A Ray node started with `ray start` (a head, or a worker joining `head_address`)."""
    num_cpus: int = 2
    num_gpus: int = 0
    head_address: str | None = None          # None: start a head
    resources: str | None = None             # JSON, e.g. '{"node2": 1}'
    address: str = ""                         # GCS address of the cluster
    dashboard_url: str = ""                   # Jobs API (heads only)
    temp_dir: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 90.0) -> LocalRay:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client, node_mgr, obj_mgr = free_ports(9)
        self.temp_dir = self.temp_dir or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        cmd = [ray_bin, "start", "--block", "--disable-usage-stats", f"--node-ip-address={LOOPBACK}",
               f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]
        if self.resources:
            cmd.append(f"--resources={self.resources}")
        if self.head_address is None:
            # Ray's token auth (on for local clusters) needs a token before `ray start --head`; a fresh
            # machine has none: make one (~/.ray/auth_token) unless one is there or RAY_AUTH_TOKEN is set
            subprocess.run([ray_bin, "get-auth-token", "--generate"], env=loopback_env(), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cmd += ["--head", f"--port={gcs}", "--include-dashboard=true", f"--dashboard-host={LOOPBACK}",
                    f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}"]
            self.address, self.dashboard_url = f"{LOOPBACK}:{gcs}", f"http://{LOOPBACK}:{dash}"
        else:
            # Ray's own `ray start`, allowed to join while staying on loopback (see service.ray_join)
            cmd[:2] = [sys.executable, "-m", "service.ray_join", "start"]
            cmd.append(f"--address={self.head_address}")
            self.address = self.head_address
        log = open(Path(self.temp_dir) / f"ray-start-{os.getpid()}-{time.time_ns()}.log", "wb")
        self.process = subprocess.Popen(cmd, env=loopback_env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait(timeout, log.name)
        return self

    def _wait(self, timeout: float, log: str) -> None:
        deadline = time.monotonic() + timeout
        if self.head_address is None:
            import httpx
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"ray start exited with {self.process.returncode}; see {log}")
                try:
                    if httpx.get(f"{self.dashboard_url}/api/version", timeout=2).status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            self.stop()
            raise RuntimeError(f"the local Ray head did not come up within {timeout:.0f} s; see {log}")
        time.sleep(3)   # a joining node registers within a few seconds; callers check the node count
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start (worker node) exited with {self.process.returncode}; see {log}")

    def stop(self, grace: float = 10.0) -> None:
        """Stop this node: `ray start --block` shuts its processes down on SIGINT; what is left of
        its process group after `grace` seconds is killed."""
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
