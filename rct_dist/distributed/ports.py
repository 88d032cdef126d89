"""TCP ports for a rendezvous on this host: the one place that asks the OS which port is free.

Imports nothing but the standard library, so world discovery (and `rct-dist world`) can use it
before torch is loaded.
"""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when `port` can be bound on `host` now (another process may take it a moment later)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` now, chosen by the OS, for a single-node rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
