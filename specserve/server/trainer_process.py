"""TrainerProcess: keeps the online trainer running beside the server, in a process of its own.

Serving never depends on it. A supervisor thread (``specserve-trainer-supervisor``) starts the
command, waits for it, and when it exits (a crash, a kill, an out-of-memory) starts it again after a
backoff that doubles from ``min_backoff`` up to ``max_backoff`` seconds and falls back to
``min_backoff`` after a run that lasted ``healthy_after`` seconds. ``stop`` terminates it (SIGTERM,
then SIGKILL after a grace period).

Isolation from serving: the child's OMP/MKL/OpenBLAS pools get ``threads`` threads (the trainer caps
torch's own pools and lowers its CPU priority itself, from its command line). It runs in its own
session, so a Ctrl-C in the server's terminal reaches the server only, which then stops the trainer;
on Linux it is sent SIGTERM if the server dies without stopping it.

Its output goes to the server's own stdout and stderr, or appended to ``log_path``.
Knows nothing about what the trainer does; the command comes from ``specserve.online.trainer``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SIGTERM = int(signal.SIGTERM)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class TrainerStats:
    running: bool
    pid: int | None
    starts: int
    """Processes started (the first one included)."""
    restarts: int
    """Starts after an exit that nobody asked for."""
    last_exit_code: int | None
    """Negative: killed by that signal (subprocess' convention)."""


class TrainerProcess:
    """Runs ``command`` until ``stop``; see the module docstring. Every method is safe from any thread."""

    def __init__(
        self,
        command: Sequence[str],
        threads: int = 1,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        healthy_after: float = 60.0,
        log_path: str | None = None,
    ) -> None:
        if not command:
            raise ValueError("the trainer command is empty")
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if not 0 < min_backoff <= max_backoff:
            raise ValueError(f"need 0 < min_backoff <= max_backoff, got {min_backoff}, {max_backoff}")
        self.command = list(command)
        self.threads = threads
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.log_path = log_path
        self.env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}
        self._preexec = self._child_setup()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # guarded by _lock:
        self._proc: subprocess.Popen | None = None
        self._starts = 0
        self._restarts = 0
        self._last_exit: int | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("this TrainerProcess was already started")
        self._thread = threading.Thread(target=self._supervise, name="specserve-trainer-supervisor", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the trainer (SIGKILL after ``grace`` seconds) and stop restarting it."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                logger.warning("online trainer (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, grace)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(grace)

    def stats(self) -> TrainerStats:
        with self._lock:
            proc = self._proc
            running = proc is not None and proc.poll() is None
            return TrainerStats(running, proc.pid if running else None, self._starts, self._restarts, self._last_exit)

    # ---- the supervisor thread ----------------------------------------------------------------

    def _supervise(self) -> None:
        backoff = self.min_backoff
        while True:
            began = time.monotonic()
            with self._lock:  # stop() either sees this process or has set the event before it starts
                if self._stop.is_set():
                    return
                try:  # the child keeps its own copy of the log file's descriptor
                    with open(self.log_path, "ab") if self.log_path else contextlib.nullcontext() as log:
                        self._proc = subprocess.Popen(
                            self.command,
                            env=self.env,
                            start_new_session=True,
                            preexec_fn=self._preexec,
                            stdout=log,
                            stderr=subprocess.STDOUT if log else None,
                        )
                except OSError as e:
                    logger.error("could not start the online trainer %s: %s", self.command[:3], e)
                    self._proc = None
                else:
                    self._starts += 1
                proc = self._proc
            if proc is not None:
                logger.info("online trainer started (pid %d, %d threads)", proc.pid, self.threads)
                code = proc.wait()
                with self._lock:
                    self._last_exit = code
                if self._stop.is_set():
                    return
                if time.monotonic() - began >= self.healthy_after:
                    backoff = self.min_backoff
                logger.warning(
                    "online trainer (pid %d) exited with status %d; serving goes on, restarting it in %.1f s",
                    proc.pid,
                    code,
                    backoff,
                )
            if self._stop.wait(backoff):
                return
            backoff = min(2 * backoff, self.max_backoff)
            with self._lock:
                self._restarts += 1

    @staticmethod
    def _child_setup() -> Callable[[], None] | None:
        """What the child runs between fork and exec (Linux): ask for SIGTERM when the supervisor thread ends."""
        if not sys.platform.startswith("linux"):
            return None
        # resolved here, in the parent: the child must not load libraries between fork and exec
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
        return lambda: prctl(PR_SET_PDEATHSIG, SIGTERM)
