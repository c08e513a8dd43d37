"""A private mosquitto on a free loopback port, for the demo, the tests and bench/.

Never the system broker on 1883, and it only ever stops the process it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "mosquitto is not installed: run 'apt-get install -y mosquitto mosquitto-clients' "
    "(Debian/Ubuntu) and try again"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


@dataclass
class TlsFiles:
    """Paths of a CA, a server certificate and one client certificate."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_tls_files(directory: str, client_cn: str = "edge-site") -> TlsFiles:
    """A throwaway CA, server cert for 127.0.0.1/localhost and a client cert (openssl CLI)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=edge-test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn, ext in (("server", "localhost", ["-extfile", "server.ext"]),
                          ("client", client_cn, [])):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext)
    return TlsFiles(str(d / "ca.pem"), str(d / "server.pem"), str(d / "server.key"),
                    str(d / "client.pem"), str(d / "client.key"))


def make_client_cert(directory: str, cn: str) -> tuple[str, str]:
    """Another client certificate (``cn``) from the CA :func:`make_tls_files` made there:
    ``(cert, key)`` paths. With ``use_identity_as_username`` the CN is the MQTT username."""
    d = Path(directory)
    name = "client-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in cn)
    for args in (("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout",
                  f"{name}.key", "-out", f"{name}.csr"),
                 ("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                  "-CAcreateserial", "-days", "2", "-out", f"{name}.pem")):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


@dataclass
class Broker:
    """A mosquitto we started; ``restart()`` keeps the same port and persistence."""

    port: int
    workdir: str
    tls: TlsFiles | None = None
    extra_conf: str = ""
    host: str = "127.0.0.1"
    # A whole mosquitto.conf for this port instead of the one written here (the
    # shipped config/mosquitto/ in the ACL tests); "user root" is added when root.
    conf: Callable[[int], str] | None = field(default=None, repr=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def conf_path(self) -> str:
        return os.path.join(self.workdir, "mosquitto.conf")

    def _write_conf(self) -> None:
        if self.conf is not None:
            text = self.conf(self.port)
            if os.geteuid() == 0:
                text += "\nuser root\n"   # see below: pytest's 0700 folders
            Path(self.conf_path).write_text(text + "\nlog_dest stderr\n")
            return
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            # A test or bench floods hundreds of thousands of QoS 1 messages.
            "max_inflight_messages 0",
            "max_queued_messages 0",
            "max_queued_bytes 0",
            # Nagle on the broker's client sockets adds up to ~40 ms per hop to a lone event.
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to its own user, which cannot read
            # a 0700 test folder (pytest's tmp_path) holding the TLS files.
            lines.append("user root")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
        Path(self.conf_path).write_text("\n".join(lines) + "\n" + self.extra_conf)

    def start(self, timeout: float = 10.0) -> Broker:
        self._write_conf()
        log = open(os.path.join(self.workdir, "mosquitto.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", self.conf_path],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see "
                                   f"{self.workdir}/mosquitto.log")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port),
                                                                        0.2):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} in {timeout}s")

    def kill(self) -> None:
        """SIGKILL: the broker loses everything it held in memory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()


def start_broker(workdir: str | None = None, *, tls: TlsFiles | None = None,
                 port: int | None = None, extra_conf: str = "",
                 conf: Callable[[int], str] | None = None) -> Broker:
    workdir = workdir or tempfile.mkdtemp(prefix="edge-mosquitto-")
    return Broker(port=port or free_port(), workdir=workdir, tls=tls,
                  extra_conf=extra_conf, conf=conf).start()
