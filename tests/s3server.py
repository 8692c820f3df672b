"""moto's S3 server as a real HTTP process on a free loopback port: the S3-compatible store of the
deployment and multi-node tests, reached through s3fs exactly as production reaches S3 or MinIO."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cluster import LOOPBACK, free_ports
from tests.conftest import dies_with_the_tests


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server as its own process on a free loopback port; yields (endpoint, access log)."""
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", LOOPBACK, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=dies_with_the_tests)
    endpoint = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not come up; see {log}") from None
                time.sleep(0.2)
        yield endpoint, log
    finally:
        proc.terminate()
        proc.wait(10)
