"""A throw-away PostgreSQL server for the tests: Debian's `postgresql` binaries, a cluster in a temporary directory.

`PostgresServer` runs initdb and pg_ctl (found on PATH or under /usr/lib/postgresql/*/bin, the newest version) with
trust authentication, listening on 127.0.0.1 and a free port only, its socket in its own directory, no fsync; as the
'postgres' system user when the tests run as root (postgres refuses to run as root). `skip_reason()` says why no
server can be started here (None when one can); the `postgres` fixture in conftest.py skips with it.
`make test` installs the Debian package when the binaries are missing. Knows nothing about specserve.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

INSTALL_HINT = "`make test` installs it, or: apt-get install --no-install-recommends postgresql"


def _has_server(bindir: str) -> bool:
    return all(os.path.exists(os.path.join(bindir, tool)) for tool in ("pg_ctl", "initdb"))


def pg_bindir() -> str | None:
    """The directory of pg_ctl and initdb: PATH's, else the newest /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which("pg_ctl")
    if found and _has_server(os.path.dirname(os.path.realpath(found))):
        return os.path.dirname(os.path.realpath(found))
    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if _has_server(d)]
    version = lambda d: tuple(int(x) for x in d.split("/")[-2].split(".") if x.isdigit())
    return max(dirs, key=version, default=None)


def skip_reason() -> str | None:
    """Why no PostgreSQL server can be started by these tests on this machine; None when one can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'specserve[postgres]')"
    if pg_bindir() is None:
        return f"no PostgreSQL server binaries (pg_ctl, initdb) on PATH or in /usr/lib/postgresql/*/bin; {INSTALL_HINT}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: cannot start postgres as another user"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return f"running as root and there is no 'postgres' user to run the server as; {INSTALL_HINT}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster: `start()`, `stop(mode)`, `url(db)`, `new_database()`; `close()` stops it and deletes its files."""

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError(skip_reason() or "no PostgreSQL server binaries")
        # not under pytest's tmp dir: that is private to this user, and the server may run as 'postgres'
        self.root = tempfile.mkdtemp(prefix="specserve-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.running = False
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        try:
            if self.prefix:
                shutil.chown(self.root, "postgres")
            self._run("initdb", "-D", self.data, "-A", "trust", "-U", "specserve", "--no-sync", "-E", "UTF8")
            self.start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.prefix, os.path.join(self.bindir, tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr or done.stdout}")

    def start(self) -> None:
        """Start the server (again) on the same port; returns once it accepts connections."""
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -F"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.root, "log"), "-w", "start")
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """pg_ctl stop -m MODE ('fast': disconnect clients, shut down cleanly; 'immediate': like a crash)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")
        self.running = False

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster's files."""
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://specserve@127.0.0.1:{self.port}/{db}"

    def new_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
