"""The systemd units and udev rules: sandbox score, syntax, and the access the daemon needs.

systemd-analyze is part of the test environment (tools/bootstrap.sh installs
Debian's `systemd` package); without it these tests fail and say so, rather
than pass having checked nothing.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from agent.testing.localsite import LocalSite, Proc, edge_agent_argv
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD_DIR = ROOT / "systemd"
AGENT_UNIT = SYSTEMD_DIR / "edge-agent.service"
HQ_UNIT = SYSTEMD_DIR / "edge-agent-hq.service"
UDEV_RULES = SYSTEMD_DIR / "99-edge-agent.rules"
MODULES_LOAD = SYSTEMD_DIR / "edge-agent-modules.conf"
SYSUSERS = SYSTEMD_DIR / "edge-agent.sysusers"
UNITS = [AGENT_UNIT, HQ_UNIT]

MAX_EXPOSURE = 2.0
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")
INSTALL_HINT = ("systemd-analyze not found: install it with "
                "'apt-get install -y --no-install-recommends systemd' (or run tools/bootstrap.sh)")


def systemd_tool(name: str = "systemd-analyze") -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(INSTALL_HINT.replace("systemd-analyze", name, 1))
    return path


def systemd_analyze() -> str:
    return systemd_tool("systemd-analyze")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (units repeat keys such as DeviceAllow=)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def words(values: list[str]) -> set[str]:
    return {w for v in values for w in v.split()}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_security_exposure_is_at_most_2(unit: Path) -> None:
    """`systemd-analyze security --offline=true` rates each unit's exposure at 2.0 or less."""
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    match = EXPOSURE_RE.search(out)
    assert match, f"no exposure level in systemd-analyze output:\n{out}"
    exposure = float(match.group(1))
    open_items = "\n".join(line for line in out.splitlines() if line.startswith("✗"))
    assert exposure <= MAX_EXPOSURE, (
        f"{unit.name}: exposure {exposure} > {MAX_EXPOSURE}; open items:\n{open_items}")


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts each unit with no warning (unknown keys, bad values).

    ExecStart names /usr/bin/edge-agent, where a package installs it; verify
    insists that the binary exists, so the copy checked here points at this
    checkout's real console script instead. Everything else is verified as shipped.
    """
    console_script = Path(sys.executable).parent / "edge-agent"
    assert console_script.exists(), (
        f"{console_script} missing: install the project first (pip install -e '.[test]')")
    text = unit.read_text()
    assert "ExecStart=/usr/bin/edge-agent " in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace("ExecStart=/usr/bin/edge-agent ", f"ExecStart={console_script} "))
    proc = subprocess.run([systemd_analyze(), "verify", "--no-pager", str(copy)],
                          capture_output=True, text=True, timeout=120)
    out = (proc.stdout + proc.stderr).strip()
    ours = [line for line in out.splitlines() if unit.name in line or str(copy) in line]
    assert proc.returncode == 0, f"verify failed ({proc.returncode}):\n{out}"
    assert not ours, "systemd-analyze verify warned:\n" + "\n".join(ours)


def test_agent_unit_runs_the_daemon_the_contract_describes() -> None:
    """Type=notify with a watchdog, restart, a stop window over the 10 s drain, the outbox dir."""
    service = parse_unit(AGENT_UNIT)["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["WatchdogSec"] == ["30"]
    assert service["Restart"][-1] in {"always", "on-failure"}
    assert float(service["TimeoutStopSec"][-1]) > 10  # the daemon drains within 10 s
    assert service["ExecStart"] == [
        "/usr/bin/edge-agent run --config /etc/edge-agent/agent.toml"]
    # config's default outbox path is /var/lib/edge-agent/outbox
    assert service["StateDirectory"] == ["edge-agent"]
    assert service["ConfigurationDirectory"] == ["edge-agent"]
    assert parse_unit(AGENT_UNIT)["Unit"]["StartLimitIntervalSec"] == ["0"]


def test_agent_sandbox_keeps_what_the_daemon_needs() -> None:
    """The hardening leaves the sockets, device classes and groups the drivers and API use."""
    service = parse_unit(AGENT_UNIT)["Service"]
    # API on TCP 8787, MQTT/TLS, mDNS multicast; sd_notify; interface listing for zeroconf.
    assert words(service["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6",
                                                         "AF_NETLINK"}
    assert "PrivateNetwork" not in service
    assert service["PrivateDevices"] == ["no"]
    assert service["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0]: v.split()[1] for v in service["DeviceAllow"]}
    for cls in ("char-ttyUSB", "char-ttyACM", "char-usb_device", "char-usb", "char-i2c",
                "char-input"):
        assert allowed.get(cls) == "rw", f"DeviceAllow={cls} rw missing"
    assert words(service["SupplementaryGroups"]) == {"dialout", "plugdev", "lp"}
    # No privileged port, so no capability at all.
    assert service["CapabilityBoundingSet"] == [""]
    # User namespaces would unmap dialout/lp/plugdev and lose device access.
    assert service.get("PrivateUsers", ["no"]) == ["no"]


def test_sysusers_creates_the_units_users_with_device_groups(tmp_path: Path) -> None:
    """systemd-sysusers, run on a scratch root, creates each unit's User= and the device groups."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    # The Debian groups the agent joins, with their Debian ids.
    (etc / "group").write_text("root:x:0:\nlp:x:7:\ndialout:x:20:\nplugdev:x:46:\n")
    proc = subprocess.run([systemd_tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
                          input=SYSUSERS.read_text(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    users = {f[0]: f for f in
             (line.split(":") for line in (etc / "passwd").read_text().splitlines())}
    members = {f[0]: set(filter(None, f[3].split(","))) for f in
               (line.split(":") for line in (etc / "group").read_text().splitlines())}
    for unit in UNITS:
        service = parse_unit(unit)["Service"]
        user = service["User"][-1]
        assert user in users, f"{unit.name}: User={user} not created by {SYSUSERS.name}"
        assert users[user][6] == "/usr/sbin/nologin"
        assert int(users[user][2]) < 1000  # a system user
        assert service["Group"][-1] in members
    for group in words(parse_unit(AGENT_UNIT)["Service"]["SupplementaryGroups"]):
        assert "edge-agent" in members[group], f"edge-agent not a member of {group}"


def test_hq_unit_runs_the_receiver() -> None:
    """edge-agent-hq.service runs `edge-agent hq` as Type=notify with its own state dir."""
    service = parse_unit(HQ_UNIT)["Service"]
    assert service["Type"][-1] == "notify"
    assert service["WatchdogSec"] == ["30"]
    assert service["ExecStart"] == ["/usr/bin/edge-agent hq --config /etc/edge-agent-hq/hq.toml"]
    assert service["StateDirectory"] == ["edge-agent-hq"]  # sqlite:///var/lib/edge-agent-hq/hq.db
    assert words(service["RestrictAddressFamilies"]) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert service["PrivateDevices"] == ["yes"]


# udev subsystem (and kernel name) -> the DeviceAllow class its nodes belong to
UDEV_CLASS = {
    ("tty", "ttyUSB"): "char-ttyUSB",
    ("tty", "ttyACM"): "char-ttyACM",
    ("usbmisc", "lp"): "char-usb",
    ("usb", ""): "char-usb_device",
    ("input", "event"): "char-input",
    ("i2c-dev", "i2c-"): "char-i2c",
}
# DeviceAllow class -> the module that registers its major (must load at boot)
CLASS_MODULE = {"char-ttyUSB": "usbserial", "char-ttyACM": "cdc_acm", "char-i2c": "i2c-dev"}


def udev_rules() -> list[dict[str, str]]:
    rules = []
    for raw in UDEV_RULES.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pairs = re.findall(r'([A-Z_]+(?:\{[^}]*\})?)\s*(==|!=|\+=|:=|=)\s*"([^"]*)"', line)
        assert pairs, f"unparsed udev line: {line}"
        rules.append({f"{k}{op if op in ('==', '!=') else ''}": v for k, op, v in pairs})
    return rules


def test_udev_rules_never_open_devices_to_everyone() -> None:
    """Every node a rule touches is 0660 for one of the service's groups; none world-accessible."""
    groups = words(parse_unit(AGENT_UNIT)["Service"]["SupplementaryGroups"])
    rules = udev_rules()
    assert rules
    for rule in rules:
        assert "SUBSYSTEM==" in rule, f"rule without a subsystem: {rule}"
        mode = rule.get("MODE", "")
        assert mode == "0660", f"{rule}: MODE must be 0660 (never world-accessible)"
        assert rule.get("GROUP") in groups, f"{rule}: GROUP not in the unit's groups {groups}"
        assert "OWNER" not in rule
        if rule["SUBSYSTEM=="] == "usb":
            # Never every USB device: only printer-class interfaces or a named vendor.
            assert "ENV{ID_USB_INTERFACES}==" in rule or "ATTR{idVendor}==" in rule, rule
        if rule["SUBSYSTEM=="] == "input":
            # Never every keyboard: only known scanner makers.
            assert "ATTRS{idVendor}==" in rule, rule


def test_udev_rules_and_device_allow_agree() -> None:
    """Each device a udev rule opens is also allowed by the unit's device cgroup, and loadable."""
    service = parse_unit(AGENT_UNIT)["Service"]
    allowed = {v.split()[0] for v in service["DeviceAllow"]}
    modules = {line.strip() for line in MODULES_LOAD.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for rule in udev_rules():
        subsystem, kernel = rule["SUBSYSTEM=="], rule.get("KERNEL==", "")
        classes = [cls for (sub, prefix), cls in UDEV_CLASS.items()
                   if sub == subsystem and (not prefix or prefix in kernel)]
        assert classes, f"no DeviceAllow class known for {rule}"
        for cls in classes:
            assert cls in allowed, f"{rule} opens {cls} nodes but DeviceAllow lacks it"
            if cls in CLASS_MODULE:
                assert CLASS_MODULE[cls] in modules, (
                    f"{cls}: module {CLASS_MODULE[cls]} not loaded at boot by {MODULES_LOAD.name}")


@pytest.mark.e2e
@pytest.mark.parametrize("unit", [u for u in UNITS
                                  if parse_unit(u)["Service"]["Type"][-1] == "notify"],
                         ids=lambda p: p.name)
def test_notify_unit_command_speaks_sd_notify(unit: Path, tmp_path: Path) -> None:
    """A Type=notify unit's own command sends READY=1, WATCHDOG=1 pings and STOPPING=1 in time.

    The command line is the unit's ExecStart (this checkout's console script,
    a loopback test config), with the environment systemd gives it.
    """
    service = parse_unit(unit)["Service"]
    argv = shlex.split(service["ExecStart"][-1])
    assert argv[0] == "/usr/bin/edge-agent" and argv[2] == "--config", argv
    stop_budget = float(service["TimeoutStopSec"][-1])
    watchdog_s = 1.0  # the unit says 30 s; 1 s shows the pings without a long wait

    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock_path = tmp_path / "notify"
    notify_sock.bind(str(sock_path))
    notify_sock.setblocking(False)
    messages: list[str] = []

    def received(what: str, count: int = 1) -> bool:
        try:
            while True:
                messages.extend(notify_sock.recv(4096).decode().splitlines())
        except BlockingIOError:
            pass
        return messages.count(what) >= count

    site = LocalSite(tmp_path / "site")
    proc: Proc | None = None
    try:
        (site.workdir / "broker").mkdir()
        site.start_broker()
        site.write_configs()
        config = site.agent_config if argv[1] == "run" else site.hq_config
        proc = Proc([*edge_agent_argv(), argv[1], "--config", str(config)],
                    str(tmp_path / "process.log"),
                    env={"NOTIFY_SOCKET": str(sock_path),
                         "WATCHDOG_USEC": str(int(watchdog_s * 1_000_000))}).start()
        assert proc.popen is not None

        def ready() -> bool:
            assert proc is not None
            if not proc.alive:
                raise AssertionError(f"{argv[1]} exited:\n{proc.log_tail()}")
            return received("READY=1")

        wait_for(ready, timeout=30, what=f"READY=1 from edge-agent {argv[1]}")
        wait_for(lambda: received("WATCHDOG=1", 3), timeout=10 * watchdog_s,
                 what="three WATCHDOG=1 pings")
        stopped_at = time.monotonic()
        proc.popen.send_signal(signal.SIGTERM)
        rc = proc.popen.wait(stop_budget)
        took = time.monotonic() - stopped_at
        assert received("STOPPING=1"), messages
        assert rc == 0, f"exit {rc} after SIGTERM:\n{proc.log_tail()}"
        assert took < 10, f"took {took:.1f}s to stop; the contract says 10 s"
    finally:
        if proc is not None:
            proc.kill()
        site.stop()
        notify_sock.close()


def test_units_raise_the_open_file_limit_over_the_connection_cap() -> None:
    """LimitNOFILE in both units covers the HTTP connection cap (twice: descriptors of
    evicted connections close a loop turn later) plus the reserve, so a flood of
    connections meets the cap, never EMFILE at accept()."""
    from agent.web.httpserver import FD_RESERVE, MAX_CONNECTIONS

    for unit in UNITS:
        limit = parse_unit(unit)["Service"].get("LimitNOFILE", ["1024"])[-1]
        assert int(limit.split(":")[0]) >= 2 * MAX_CONNECTIONS + FD_RESERVE, unit.name
