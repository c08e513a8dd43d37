"""A tiny sd_notify(3) client: tell systemd we are ready, alive or stopping.

systemd's ``Type=notify`` passes the path of a datagram socket in
``$NOTIFY_SOCKET``; each message is newline-separated ``KEY=VALUE``
assignments (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...``).
A path starting with ``@`` is in the abstract namespace (leading NUL byte).
Outside systemd (tests, the demo, a terminal) the variable is unset and every
call is a quiet no-op, so callers never need to check.

``WatchdogSec=`` reaches us as ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the
process it is meant for). Ping at half that interval, from the loop whose
liveness the ping vouches for: a ping from a side thread would keep a wedged
daemon alive.

No dependency on python-systemd or sdnotify: the protocol is one sendto().
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"

# Whether the last send failed, so a broken socket is logged once per outage
# at WARNING (a Type=notify unit that never hears READY=1 is killed after
# TimeoutStartSec, and this line says why), not on every watchdog ping.
_last_send_failed = False


def _address(raw: str) -> str | bytes | None:
    """The sockaddr for ``$NOTIFY_SOCKET``: a filesystem path or an abstract name."""
    if raw.startswith("@"):
        # Abstract namespace: the name is a NUL byte followed by the rest.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # "vsock:CID:PORT" (systemd 253+, for VMs) and anything else: not for a site box.
    return None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd.

    Returns True when it was sent, False when there is no notify socket (not
    under systemd) or the send failed. Never raises: the daemon's work does not
    depend on systemd hearing about it.
    """
    global _last_send_failed
    environ = os.environ if env is None else env
    raw = environ.get(NOTIFY_SOCKET_ENV, "")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.warning("sd_notify: unsupported %s=%r; not notifying systemd", NOTIFY_SOCKET_ENV,
                    raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        if not _last_send_failed:
            log.warning("sd_notify: cannot send %r to %s: %s", state.split("=", 1)[0], raw, exc)
        _last_send_failed = True
        return False
    if _last_send_failed:
        log.info("sd_notify: %s reachable again", raw)
    _last_send_failed = False
    return True


def ready(status: str | None = None, env: Mapping[str, str] | None = None) -> bool:
    """READY=1: the outbox is open and the API listens (Type=notify start is done)."""
    msg = "READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}"
    return notify(msg, env)


def stopping(env: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1: SIGTERM received, draining."""
    return notify("STOPPING=1", env)


def watchdog(env: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: one keep-alive ping."""
    return notify("WATCHDOG=1", env)


def status(text: str, env: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: the line `systemctl status` shows."""
    return notify(f"STATUS={_one_line(text)}", env)


def _one_line(text: str) -> str:
    # A newline would start a new assignment: "STATUS=ok\nREADY=1" must not
    # become a READY from a device name.
    return " ".join(text.splitlines())


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds of systemd's watchdog timeout, or None when no watchdog is armed for us.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is for: a child
    that inherited the environment must not ping on its parent's behalf.
    """
    environ = os.environ if env is None else env
    raw_usec = environ.get(WATCHDOG_USEC_ENV, "")
    if not raw_usec:
        return None
    raw_pid = environ.get(WATCHDOG_PID_ENV, "")
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000


async def run_watchdog(healthy: Callable[[], bool] | None = None,
                       env: Mapping[str, str] | None = None) -> None:
    """Ping WATCHDOG=1 at half the watchdog interval for as long as the task runs.

    Returns at once when no watchdog is armed. Runs on the event loop, so the
    pings stop when the loop wedges. ``healthy`` (optional) can withhold a ping
    when a part the loop does not see (the outbox writer thread) is stuck.
    """
    interval = watchdog_interval(env)
    if interval is None:
        return
    period = interval / 2
    while True:
        if healthy is None or healthy():
            watchdog(env)
        else:
            log.warning("sd_notify: withholding the watchdog ping: not healthy")
        await asyncio.sleep(period)
