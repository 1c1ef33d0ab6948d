"""Ports for the servers and rendezvous endpoints that tests start.

Each pytest-xdist worker draws from a range of its own (500 ports from 20000 up, by worker number) below
Linux's ephemeral range (32768-60999, where ``bind(("", 0))`` picks): two parallel workers can never be handed
the same port, and neither can a socket some other process binds to port 0. A port is handed out only if it
can be bound right now; within a worker, tests run one at a time.
"""

from __future__ import annotations

import itertools
import os
import socket

RANGE = 500
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3" under pytest-xdist, unset without it
_FIRST = 20000 + RANGE * (int(_worker[2:]) + 1 if _worker.startswith("gw") else 0)
_tried = itertools.count()


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that no other test worker can be given."""
    for _ in range(RANGE):
        port = _FIRST + next(_tried) % RANGE
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_FIRST}-{_FIRST + RANGE - 1}")
