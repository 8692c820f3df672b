"""A process's own peak memory, as steps and the driver report it."""

import json
import subprocess
import sys

from workers.process import peak_rss_bytes

MB = 2**20


def test_a_child_reports_its_own_peak_not_its_parents():
    # Linux keeps ru_maxrss across exec: a Ray job started by its supervisor would report the supervisor's
    # peak. The figure a step reports must be the process's own.
    held = bytearray(600 * MB)
    held[::4096] = b"\1" * len(held[::4096])           # resident, not just reserved
    assert peak_rss_bytes() >= 600 * MB
    out = subprocess.run([sys.executable, "-c", "import json; from workers.process import peak_rss_bytes; "
                          "print(json.dumps(peak_rss_bytes()))"], capture_output=True, text=True, check=True)
    child = json.loads(out.stdout)
    assert 0 < child < 300 * MB
    del held
