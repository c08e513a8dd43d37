"""The suite's own PostgreSQL: started privately, never the machine's server."""

from __future__ import annotations

import os
import pwd
import subprocess

from agent.testing.localpg import DB_USER, PgServer, pg_bindir, start_pg


def _psql(url: str, sql: str) -> str:
    psql = os.path.join(pg_bindir(), "psql")
    out = subprocess.run([psql, "-X", "-At", url, "-c", sql], check=True,
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_server_is_private_and_loopback_only(pg_server: PgServer) -> None:
    """The fixture's server listens on 127.0.0.1 on its own port, not 5432, as a non-root user."""
    assert pg_server.port != 5432
    url = pg_server.url()
    assert _psql(url, "SHOW listen_addresses") == "127.0.0.1"
    assert _psql(url, "SHOW port") == str(pg_server.port)
    assert _psql(url, "SHOW data_directory").startswith(str(pg_server.root))
    owner = os.stat(pg_server.root / "data").st_uid
    assert owner != 0, "PostgreSQL must not run as root"
    assert pwd.getpwuid(owner).pw_name
    assert _psql(url, "SELECT current_user") == DB_USER


def test_databases_are_separate(pg_url: str, pg_server: PgServer) -> None:
    """Each pg_url is a fresh, empty database of its own."""
    _psql(pg_url, "CREATE TABLE mark (x int)")
    other = pg_server.create_database(f"other_{os.getpid()}")
    assert _psql(other, "SELECT count(*) FROM pg_tables WHERE tablename = 'mark'") == "0"


def test_stop_removes_everything() -> None:
    """stop() ends the server it started and removes its folder; kill() is a crash."""
    server = start_pg()
    root = server.root
    assert server.alive()
    server.kill()
    assert not server.alive()
    server.stop()
    assert not root.exists()
