"""A `specserve serve` subprocess on the loopback: started on a free port, waited for on /health, stopped by SIGTERM.

Its output goes to a log file, whose tail is quoted when the server dies or never becomes healthy.
Knows nothing about the load put on it.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

HOST = "127.0.0.1"  # where started servers listen: never anything but the loopback
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class LocalServer:
    """One `specserve serve` subprocess on the loopback: started, waited for on /health, stopped with SIGTERM."""

    def __init__(self, mode: str, flags: list[str], log_path: Path) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "specserve.cli",
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *flags,
        ]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.exit_status: int | None = None

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def healthy(self) -> bool:
        """True once /health answers 200; raises if the process has exited."""
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the {self.mode} server exited with status {self.process.returncode} before it was "
                f"healthy; its log ({self.log_path}) ends:\n{self.log_tail()}"
            )
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        """SIGTERM (the server drains and exits 0), SIGKILL after STOP_TIMEOUT_S; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        self.exit_status = self.process.returncode
        return self.exit_status


def wait_healthy(servers: list[LocalServer], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    with tqdm(total=len(servers), desc="starting servers", unit="server") as bar:
        while waiting:
            for server in [s for s in waiting if s.healthy()]:
                waiting.remove(server)
                bar.update(1)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(
                    f"the {waiting[0].mode} server did not answer {waiting[0].url}/health within "
                    f"{timeout:g} s (--startup-timeout); its log ends:\n{waiting[0].log_tail()}"
                )
            if waiting:
                time.sleep(0.5)
