"""A private PostgreSQL on a free loopback port, for the tests and bench/.

``initdb`` in a fresh temporary folder, ``postgres`` listening on 127.0.0.1 only,
on a port that was free a moment ago, with its socket in that folder. Never the
machine's own server on 5432, and it only ever stops the process it started.

PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user that Debian's package creates (the folder is handed to it);
as any other user it runs as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.testing.localbroker import free_port

INSTALL_HINT = (
    "PostgreSQL's server binaries are not installed: run "
    "'apt-get install -y --no-install-recommends postgresql' (Debian/Ubuntu; "
    "tools/bootstrap.sh does it as root) and try again"
)
# The user the server runs as when we are root (Debian's package creates it).
SERVER_USER = "postgres"
# The superuser initdb creates; tests connect as it over loopback with trust auth.
DB_USER = "edge"


def pg_bindir() -> str:
    """Where initdb and postgres live: $PG_BINDIR, else PATH, else Debian's versioned folders."""
    env = os.environ.get("PG_BINDIR")
    if env and os.path.exists(os.path.join(env, "initdb")):
        return env
    # Debian's versioned folders first: they hold the whole set (postgres, pg_ctl,
    # psql); an initdb on PATH may be a lone wrapper.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: _version_key(p.split("/")[4]))
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("postgres")
    if found and os.path.exists(os.path.join(os.path.dirname(found), "initdb")):
        return os.path.dirname(found)
    raise RuntimeError(INSTALL_HINT)


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _server_identity() -> dict[str, Any]:
    """subprocess arguments that make a child run as SERVER_USER when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError as exc:
        raise RuntimeError(f"running as root and there is no '{SERVER_USER}' user to run "
                           f"PostgreSQL as; {INSTALL_HINT}") from exc
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class PgServer:
    """A running private PostgreSQL. ``url()`` names a database on it."""

    port: int
    root: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    _created: set[str] = field(default_factory=set)

    host: str = "127.0.0.1"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{DB_USER}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL. Names are [a-z0-9_] (we make them)."""
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ValueError(f"database name {name!r}: use [a-z0-9_]")
        self._psql(f'CREATE DATABASE "{name}"')
        self._created.add(name)
        return self.url(name)

    def _psql(self, sql: str) -> None:
        subprocess.run(
            [os.path.join(pg_bindir(), "psql") if os.path.exists(os.path.join(pg_bindir(), "psql"))
             else "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", DB_USER, "-d", "postgres", "-c", sql],
            check=True, capture_output=True, timeout=30,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the postmaster (a crash): its children exit when they notice."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Fast shutdown, then remove the folder."""
        if self.alive():
            # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, exit.
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def start_pg(*, fsync: bool = False, timeout: float = 60.0) -> PgServer:
    """initdb and start a private server; wait until it accepts connections.

    ``fsync=False`` suits tests (the data dies with the test); bench/ passes
    ``fsync=True`` so its figures are of a durable server.
    """
    bindir = pg_bindir()
    identity = _server_identity()
    # Not under pytest's tmp_path: that is 0700 and root's, and the server user must
    # reach its own folder.
    root = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    data = root / "data"
    log_path = root / "postgres.log"
    if identity:
        os.chown(root, identity["user"], identity["group"])
    os.chmod(root, 0o700)
    try:
        subprocess.run(
            [os.path.join(bindir, "initdb"), "-D", str(data), "-U", DB_USER, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, capture_output=True, timeout=timeout, cwd=root, **identity,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    port = free_port()
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    if identity:
        os.chown(log_path, identity["user"], identity["group"])
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": str(root),
        "fsync": "on" if fsync else "off",
        "synchronous_commit": "on" if fsync else "off",
        "full_page_writes": "on" if fsync else "off",
        "max_connections": "200",
        "shared_buffers": "64MB",
    }
    argv = [os.path.join(bindir, "postgres"), "-D", str(data)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                            cwd=root, start_new_session=True, **identity)
    log_file.close()
    server = PgServer(port=port, root=root, proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            tail = server.log_tail()
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"postgres exited at start:\n{tail}")
        if _accepting(port) and b"ready to accept connections" in _read(log_path):
            return server
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"postgres did not accept connections within {timeout}s")
        time.sleep(0.1)
