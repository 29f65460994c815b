"""run_server: serve an app with uvicorn until SIGINT / SIGTERM, drain, and exit cleanly.

On the first signal the AsyncEngine refuses new requests (503) at once; uvicorn then waits for
those in flight, and the app's lifespan stops the engine thread. A second SIGINT forces the exit.
Stock uvicorn re-raises the signal once it has shut down, so the process would die *by* SIGTERM
(status -15) even after a complete drain; here a drained shutdown returns 0, which is what process
supervisors read as a clean stop. Must be called from the main thread (signals are only delivered
there). Knows nothing about routes or models.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from specserve.server.async_engine import AsyncEngine

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine) -> None:
        super().__init__(config)
        self.async_engine = async_engine

    def handle_exit(self, sig: int, frame) -> None:
        self.async_engine.begin_drain()
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal after the shutdown."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run_server(app: FastAPI, async_engine: AsyncEngine, host: str, port: int, log_level: str = "info") -> int:
    """Serve until a signal, drain, and return the exit status: 0 after a clean drain, 1 if startup failed."""
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), async_engine)
    server.run()
    return 0 if server.started else 1
