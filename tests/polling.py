"""Polling: wait for what another thread or process does (a server starting, a writer flushing, a swap).

Knows nothing of servers or models; imported by plain name (`from polling import wait_until`), as pytest
puts tests/ on sys.path.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; whether it became true.

    The first polls come 10 ms apart and back off to `interval`: a condition that holds soon costs little
    waiting, a slow one (a subprocess starting) no busy loop. The timeout only matters when a test fails, so
    it is generous: a slow pass on a shared, loaded machine must not turn into a failure.
    """
    deadline = time.monotonic() + timeout
    pause = min(0.01, interval)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause)
        pause = min(2 * pause, interval)
    return bool(predicate())
