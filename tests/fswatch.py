"""Which files and folders this process opens or lists, seen through Python's audit hooks (PEP 578): the
"open" event (builtins.open, io.open, os.open) and the listing events (os.listdir, os.scandir, glob.glob).
A hook cannot be removed, so one is installed on first use and records only inside `watch()`."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

EVENTS = ("open", "os.listdir", "os.scandir", "glob.glob")
_lock = threading.Lock()
_watchers: list[list[tuple[str, str]]] = []
_installed = False


def _hook(event: str, args: tuple) -> None:
    if not _watchers or event not in EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.fsdecode(path)
        for seen in _watchers:
            seen.append((event, path))


@contextlib.contextmanager
def watch() -> Iterator[list[tuple[str, str]]]:
    """(event, path) of every open and listing in this process (every thread) while inside."""
    global _installed
    with _lock:
        if not _installed:
            sys.addaudithook(_hook)
            _installed = True
    seen: list[tuple[str, str]] = []
    _watchers.append(seen)
    try:
        yield seen
    finally:
        _watchers.remove(seen)


def touched(seen: list[tuple[str, str]], folder: str | os.PathLike) -> list[tuple[str, str]]:
    """The events of `seen` on `folder` or anything in it (paths compared with symlinks and `..` resolved)."""
    top = os.path.realpath(folder)
    out = []
    for event, path in seen:
        real = os.path.realpath(path)
        if real == top or real.startswith(top + os.sep) or os.path.abspath(path).startswith(top + os.sep):
            out.append((event, path))
    return out
