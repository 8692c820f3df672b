"""The embedded Ray head: started by the service when no Ray address is configured, stopped on exit.

Every process binds to loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, --node-ip-address 127.0.0.1)
and every port is a free one picked here: 6379, Ray's default GCS port, may belong to a Redis.
`ray start --block` runs in its own process group, so stopping it stops exactly this cluster and
never another Ray on the machine (`ray stop` would stop them all). Stopping takes the whole process
tree as it stands (Ray's job drivers run in sessions of their own, outside that group) and removes
the temp dir this node made.

A head started with a `state_file` writes its identity there (pid, ports, temp dir) and removes it
when stopped: a service killed with SIGKILL leaves the file behind, and the next start finds the
orphaned head through it (`stop_orphan`) and stops it before starting its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOOPBACK = "127.0.0.1"
HEAD_FILE = "ray-head.json"        # under LADLE_HOME: the embedded head's identity while it runs


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
    state_file: Path | None = None           # heads: where their identity is kept while they run
    env: dict[str, str] = field(default_factory=dict, repr=False)   # added to the node's environment (secrets)
    process: subprocess.Popen | None = field(default=None, repr=False)
    _own_temp: bool = field(default=False, repr=False)

    def start(self, timeout: float = 90.0) -> LocalRay:
        ray_bin = str(Path(sys.executable).with_name("ray"))
        gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client, node_mgr, obj_mgr = free_ports(9)
        if not self.temp_dir:
            self.temp_dir, self._own_temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp"), True
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
        self.process = subprocess.Popen(cmd, env=dict(loopback_env(), **self.env), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait(timeout, log.name)
        if self.state_file is not None and self.head_address is None:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.identity()))
            tmp.replace(self.state_file)
        return self

    def identity(self) -> dict:
        return {"pid": self.process.pid if self.process else None, "address": self.address,
                "dashboard_url": self.dashboard_url, "temp_dir": self.temp_dir, "own_temp": self._own_temp,
                "service_pid": os.getpid()}

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

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

    def stop(self, grace: float = 8.0) -> None:
        """Stop this node: `ray start --block` shuts its processes down on SIGINT; whatever of its
        process tree is left after `grace` seconds is killed, and the temp dir it made removed."""
        if self.process is None:
            return
        stop_tree(self.process.pid, grace, temp_dir=self.temp_dir if self._own_temp else None)
        self.process.wait()
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    def __enter__(self) -> LocalRay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_tree(pid: int, grace: float, *, temp_dir: str | None = None) -> None:
    """SIGINT to `pid` (a `ray start --block`), then SIGKILL to whatever is left after `grace`
    seconds of its process tree (taken before the signal) and of its process group."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if tree:
        try:
            root.send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            pass
        psutil.wait_procs(tree[:1], timeout=grace)
        # what `ray start` stopped is gone; what it left gets a moment, then SIGKILL
        _, alive = psutil.wait_procs(tree[1:], timeout=0.5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


class HeadInUse(RuntimeError):
    """The embedded Ray head of this LADLE_HOME belongs to another service that is still running."""


def ensure_head_free(state_file: Path) -> None:
    """HeadInUse if the head recorded in `state_file` belongs to another service that still runs."""
    try:
        ident = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return
    pid = ident.get("service_pid")
    if pid is not None and pid != os.getpid() and psutil.pid_exists(pid) and _is_service(pid):
        raise HeadInUse(f"another Ladle service (pid {pid}) runs the Ray head of {state_file.parent}; "
                        "stop it first, or give this one another LADLE_HOME")


def stop_orphan(state_file: Path, grace: float = 8.0) -> dict | None:
    """Stop the head a killed service left running (found through its state file), with its whole
    process tree and temp dir; returns its identity, or None if there was none (or it had died)."""
    try:
        ident = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    ensure_head_free(state_file)
    state_file.unlink(missing_ok=True)
    pid, temp_dir = ident.get("pid"), ident.get("temp_dir") or ""
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline()) if pid else ""
    except psutil.NoSuchProcess:
        cmdline = ""
    if "ray" in cmdline and temp_dir and temp_dir in cmdline:      # the pid is still that head, not a reused one
        stop_tree(pid, grace, temp_dir=temp_dir if ident.get("own_temp") else None)
        return ident
    if ident.get("own_temp") and temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return None


def _is_service(pid: int) -> bool:
    try:
        return "ladle" in " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return False


def unfit(cpus: float, gpus: float, nodes: list[dict[str, float]] | None, memory: float = 0.0) -> str | None:
    """Why no node of the cluster can hold one ingredient worker asking for `cpus`, `gpus` and `memory`
    bytes, or None if one can (or the nodes are not known)."""
    if not nodes or any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus
                        and (not memory or n.get("memory", 0.0) >= memory) for n in nodes):
        return None
    most_cpu, most_gpu = max(n.get("CPU", 0.0) for n in nodes), max(n.get("GPU", 0.0) for n in nodes)
    if memory and all(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        most = max(n.get("memory", 0.0) for n in nodes)
        return (f"no node of the cluster has the {memory / 2**30:.1f} GiB of memory a worker of this job needs "
                f"(estimated from the model's size and the batch): its {len(nodes)} node(s) offer Ray at most "
                f"{most / 2**30:.1f} GiB each")
    return (f"no node of the cluster can run an ingredient with {cpus:g} CPUs and {gpus:g} GPUs "
            f"(resources.cpus_per_ingredient, resources.gpus_per_ingredient): its {len(nodes)} node(s) have at "
            f"most {most_cpu:g} CPUs and {most_gpu:g} GPUs each")
