"""This process's own memory figures, for accounting and benchmarks. Importable without torch."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int | None:
    """The peak resident set of this process's image: `VmHWM` in /proc/self/status on Linux.

    Not `ru_maxrss`: Linux carries the largest RSS across exec, so a process started by a larger one (a
    Ray job by its supervisor, a benchmark's child by the benchmark) reports its parent's peak as its own.
    Elsewhere `ru_maxrss` (bytes on macOS, KiB on other systems); None where neither exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
