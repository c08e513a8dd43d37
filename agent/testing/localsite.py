"""A whole site on loopback: private broker, HQ receiver and agent processes.

The demo, bench/ and the end-to-end tests run the real ``edge-agent`` and
``edge-agent hq`` processes through this module, so all three exercise exactly
what ships. Only processes started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.testing.localbroker import Broker, TlsFiles, free_port, start_broker


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table: [[rooms]] bands, sensor plausibility
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def write_toml(path: str | Path, sections: dict[str, Any]) -> None:
    """Write a small TOML file: tables of scalars/lists and arrays of tables."""
    out: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{name}]]")
                out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
        else:
            out.append(f"[{name}]")
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
            out.append("")
    Path(path).write_text("\n".join(out), encoding="utf-8")


# How many times edge_agent_argv() was asked: the suite checks that a test starting
# a real edge-agent carries the e2e marker (tests/conftest.py).
ARGV_CALLS = [0]


def edge_agent_argv() -> list[str]:
    """How to start this checkout's ``edge-agent``: the console script beside our Python."""
    ARGV_CALLS[0] += 1
    script = Path(sys.executable).with_name("edge-agent")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "agent.cli"]


@dataclass
class Proc:
    """A process we started; its output goes to ``log_path``."""

    argv: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                      env={**os.environ, **self.env}, start_new_session=True)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.alive:
            assert self.popen is not None
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def terminate(self, timeout: float = 15.0) -> int | None:
        if self.popen is None:
            return None
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class LocalSite:
    """Broker + HQ receiver + one agent, all on loopback, under ``workdir``."""

    workdir: Path
    site_id: str = "co-denver-01"
    tls: TlsFiles | None = None
    agent_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    rooms: list[dict[str, Any]] = field(default_factory=list)   # [[rooms]] (issue 5)
    broker: Broker | None = None
    hq: Proc | None = None
    agent: Proc | None = None
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    api_port: int = field(default_factory=free_port)
    # HQ proves its acks and commands (issue 9): a master key for HQ, the derived
    # site key for the agent.
    proof_keys: bool = False
    master_key: bytes = field(default_factory=lambda: secrets.token_hex(32).encode(), repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- paths ---------------------------------------------------------------
    @property
    def agent_config(self) -> Path:
        return self.workdir / "agent.toml"

    @property
    def hq_config(self) -> Path:
        return self.workdir / "hq.toml"

    @property
    def hq_db(self) -> Path:
        return self.workdir / "hq" / "hq.db"

    @property
    def outbox_path(self) -> Path:
        return self.workdir / "outbox"

    @property
    def site_key(self) -> bytes:
        """The key the agent needs (what ``edge-agent hq site-key`` prints, as bytes)."""
        from agent.proof import derive_site_key

        return derive_site_key(self.master_key, self.site_id)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- config --------------------------------------------------------------
    def _mqtt(self, client_id: str) -> dict[str, Any]:
        assert self.broker is not None
        mqtt: dict[str, Any] = {"hosts": ["127.0.0.1"], "port": self.broker.port,
                                "tls": self.tls is not None, "client_id": client_id,
                                "keepalive_s": 5, "ack_timeout_s": 5.0,
                                "backoff_min_s": 0.1, "backoff_max_s": 1.0}
        if self.tls is not None:
            mqtt.update(ca_file=self.tls.ca, cert_file=self.tls.client_cert,
                        key_file=self.tls.client_key)
        return mqtt

    def write_configs(self) -> None:
        tokens = self.workdir / "tokens"
        tokens.write_text(f"cli {self.token}\npos-1 {self.token}-pos\n", encoding="utf-8")
        tokens.chmod(0o600)
        sections: dict[str, Any] = {
            "site": {"id": self.site_id, "name": "Denver Flagship", "timezone": "America/Denver"},
            "mqtt": self._mqtt(f"edge-{self.site_id}"),
            "outbox": {"path": str(self.outbox_path)},
            "api": {"bind": "127.0.0.1", "port": self.api_port, "tokens_file": str(tokens),
                    "advertise": False, "advertise_interfaces": ["127.0.0.1"]},
        }
        hq: dict[str, Any] = {"store": f"sqlite:///{self.hq_db}"}
        if self.proof_keys:
            master, site_key = self.workdir / "hq-master.key", self.workdir / "site.key"
            master.write_bytes(self.master_key + b"\n")
            site_key.write_text(self.site_key.hex() + "\n", encoding="ascii")
            for path in (master, site_key):
                path.chmod(0o600)
            sections["mqtt"]["hq_key_file"] = str(site_key)
            hq["master_key_file"] = str(master)
        for name, values in self.agent_overrides.items():
            sections[name] = {**sections.get(name, {}), **values}
        if self.devices:
            sections["devices"] = self.devices
        if self.rooms:
            sections["rooms"] = self.rooms
        write_toml(self.agent_config, sections)
        write_toml(self.hq_config, {
            "mqtt": self._mqtt(f"hq-{self.site_id}-{secrets.token_hex(3)}"),
            "hq": hq,
        })

    # -- processes -----------------------------------------------------------
    def start_broker(self) -> Broker:
        (self.workdir / "broker").mkdir(exist_ok=True)
        self.broker = start_broker(str(self.workdir / "broker"), tls=self.tls) if self.broker \
            is None else self.broker.start()
        return self.broker

    def start_hq(self) -> Proc:
        self.hq = Proc([*edge_agent_argv(), "hq", "--config", str(self.hq_config)],
                       str(self.workdir / "hq.log")).start()
        return self.hq

    def start_agent(self, wait: bool = True, timeout: float = 20.0) -> Proc:
        self.agent = Proc([*edge_agent_argv(), "run", "--config", str(self.agent_config)],
                          str(self.workdir / "agent.log")).start()
        if wait:
            self.wait_agent_ready(timeout)
        return self.agent

    def wait_agent_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.agent is not None
            if not self.agent.alive:
                raise RuntimeError(f"edge-agent exited:\n{self.agent.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError), \
                    urllib.request.urlopen(f"{self.api_url}/healthz", timeout=1) as r:  # noqa: S310 - loopback http URL we built
                if r.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"edge-agent not ready in {timeout}s:\n"
                           f"{self.agent.log_tail() if self.agent else ''}")

    def start(self) -> LocalSite:
        self.start_broker()
        self.write_configs()
        self.start_hq()
        self.start_agent()
        return self

    def stop(self) -> None:
        for proc in (self.agent, self.hq):
            if proc is not None:
                proc.terminate()
        if self.broker is not None:
            self.broker.stop()

    # -- the API, as a POS would use it ----------------------------------------
    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None,
                timeout: float = 10.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.api_url}{path}", data=data,  # noqa: S310 - http
                                     method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback http
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def hq_events(self, kind: str) -> list[dict[str, Any]]:
        """What HQ stored for this site and kind, in seq order (read-only, any time)."""
        import sqlite3

        if not self.hq_db.exists():
            return []
        con = sqlite3.connect(f"file:{self.hq_db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT payload FROM events WHERE site=? AND kind=? ORDER BY seq",
                               (self.site_id, kind)).fetchall()
        except sqlite3.OperationalError:
            return []
        finally:
            con.close()
        return [json.loads(row[0]) for row in rows]


FIXED_SOLD_AT = "2026-11-22T10:03:11-07:00"


def sample_sale(n: int, register: str = "pos-1", sold_at: str = FIXED_SOLD_AT) -> dict[str, Any]:
    """A valid sale payload, shaped after Metrc's sales receipt; ``sold_at`` fixed (tests
    compare days) unless given (the demo gives the time of the sale)."""
    tag = f"1A4FF01000000220000{n % 100000:05d}"
    return {
        "receipt_number": f"R-{n:06d}",
        "sold_at": sold_at,
        "customer_type": "Consumer",
        "patient_license": None,
        "register": register,
        "lines": [{"package_tag": tag, "quantity": "3.5", "unit": "Grams", "price": "35.00",
                   "total": "35.00"}],
        "total": "35.00",
    }
