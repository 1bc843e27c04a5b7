"""Network helpers for the optional downloads: a probe that cannot hang, and a socket timeout."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager


@contextmanager
def _socket_timeout(seconds: float):
    """torchvision downloads through urllib without a timeout; a stalled server must not hang us."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _reachable(host: str | None, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection opens within `timeout` s. In a daemon thread, because a DNS lookup
    on a machine without network can block far longer than any socket timeout."""
    if not host:
        return False
    opened = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)
