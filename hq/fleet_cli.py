"""``edge-agent hq fleet`` and ``edge-agent hq send`` (CONTRACT 8, "The fleet").

``fleet`` reads the fleet tables of the HQ store (written by the receivers) and
prints one row per site, registered or seen; exit 0 when every registered site
is online, 1 otherwise, 2 when the store cannot be read.

``send`` publishes ``P/commands/NAME`` with ``{"id", "args"}`` and prints the
site's result from ``P/command-results``; exit 0 ok, 1 the site answered with a
failure, 2 bad usage, 3 no answer in time (or no broker).
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from agent.config import SITE_ID_RE
from agent.errors import AgentError
from hq.backends import open_store
from hq.config import HqReceiverConfig
from hq.fleet import FleetPolicy, SiteState, fleet_rows
from hq.report import format_age
from hq.store import StoreError

COMMAND_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
SEND_TIMEOUT_S = 15.0


def policy(cfg: HqReceiverConfig) -> FleetPolicy:
    return FleetPolicy(silent_after_s=cfg.hq.health_interval_s * cfg.hq.silent_after_intervals,
                       report_within_h=cfg.compliance.report_within_h)


def read_states(cfg: HqReceiverConfig) -> dict[str, SiteState]:
    """The stored fleet state; :class:`StoreError` when the store is missing or unreadable."""
    from hq.fleet_store import open_fleet_store

    open_store(cfg.hq.store, create=False).close()  # exists and is an HQ store
    fleet = open_fleet_store(cfg.hq.store)
    try:
        return fleet.states()
    finally:
        fleet.close()


def fleet_report(cfg: HqReceiverConfig, states: dict[str, SiteState],
                 now: float) -> dict[str, Any]:
    return {"sites": fleet_rows(cfg.hq.sites, states, now, policy(cfg)),
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}


def _kinds(values: dict[str, Any], fmt: Any) -> str:
    shown = [f"{k} {fmt(v)}" for k, v in sorted(values.items()) if v]
    return ", ".join(shown) or "-"


def format_fleet(report: dict[str, Any], now: float) -> str:
    header = ("SITE", "NAME", "ST", "STATUS", "LAST SEEN", "VERSION", "BACKLOG",
              "OLDEST UNSENT", "DEVICES DOWN", "ALARMS")
    rows = []
    for r in report["sites"]:
        seen = "-"
        if r["last_seen"]:
            from hq.store import parse_time

            seen = format_age(max(0.0, now - parse_time(r["last_seen"]).timestamp())) + " ago"
        rows.append((r["site"], r["name"], r["state"] or "-", r["status"], seen,
                     r["version"] or "-", _kinds(r["backlog"], str),
                     _kinds(r["oldest_unsent_s"], format_age),
                     ", ".join(r["devices_down"]) or "-",
                     ", ".join(a.get("code") or "?" for a in r["alarms"]) or "-"))
    if not rows:
        return "no sites registered ([[hq.sites]]) or heard from"
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    registered = [r for r in report["sites"] if r["registered"]]
    bad = [r for r in registered if r["status"] != "online"]
    lines.append("")
    lines.append(f"{len(bad)} of {len(registered)} registered site(s) not online: "
                 + ", ".join(f"{r['site']} ({r['status']})" for r in bad) if bad
                 else f"all {len(registered)} registered site(s) online")
    return "\n".join(lines)


def all_online(report: dict[str, Any]) -> bool:
    return all(r["status"] == "online" for r in report["sites"] if r["registered"])


def fleet_main(cfg: HqReceiverConfig, as_json: bool, *, out: TextIO | None = None,
               err: TextIO | None = None, now: float | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    now = time.time() if now is None else now
    try:
        states = read_states(cfg)
    except StoreError as exc:
        print(exc, file=err)
        return 2
    report = fleet_report(cfg, states, now)
    print(json.dumps(report, indent=2) if as_json else format_fleet(report, now), file=out)
    return 0 if all_online(report) else 1


# -- send -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tls:
    """What :func:`hq.command.send_command` reads of a TLS setup."""

    ca: str | None
    client_cert: str | None
    client_key: str | None


def parse_args_json(text: str, where: str) -> dict[str, Any]:
    """The command's args: a JSON object; ``ValueError`` names the option."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: must be a JSON object")
    return value


def send_main(cfg: HqReceiverConfig, name: str, site: str, args_json: str | None,
              args_file: str | None, *, timeout: float = SEND_TIMEOUT_S,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    from hq.command import send_command

    out = out or sys.stdout
    err = err or sys.stderr
    if not COMMAND_NAME_RE.match(name):
        print(f"NAME {name[:70]!r}: must be a command name such as catalog-put", file=err)
        return 2
    if not SITE_ID_RE.match(site):
        print(f"--site {site[:70]!r}: must match [a-z0-9-]{{1,64}}", file=err)
        return 2
    try:
        if args_file is not None:
            try:
                with open(args_file, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"--args-file {args_file}: cannot read: {exc}") from None
            args = parse_args_json(text, f"--args-file {args_file}")
        else:
            args = parse_args_json(args_json or "{}", "--args")
    except ValueError as exc:
        print(exc, file=err)
        return 2
    m = cfg.mqtt
    tls = _Tls(m.ca_file or None, m.cert_file or None, m.key_file or None) if m.tls else None
    extra: dict[str, Any] = {}
    if m.username:
        extra["auth"] = (m.username, m.secret_password())
    if cfg.hq.master_key_file:   # prove the command came from HQ (agent/proof.py)
        from agent.proof import KeyFileError, derive_site_key, read_master_key

        try:
            extra["key"] = derive_site_key(read_master_key(cfg.hq.master_key_file), site)
        except KeyFileError as exc:
            print(exc, file=err)
            return 2
    last: Exception | None = None
    # One id across hosts: an agent that got it through the first answers a repeat
    # with its first result instead of running it twice.
    command_id = f"hq-{secrets.token_hex(8)}"
    for host in m.hosts:  # failover, as the receiver does
        try:
            result = send_command(host, m.port, f"{m.topic_prefix}/{site}", name, args,
                                  command_id=command_id, timeout=timeout, tls=tls, **extra)
        except (AgentError, OSError, ValueError) as exc:
            last = exc
            continue
        print(json.dumps(result, indent=2), file=out)
        return 0 if result.get("ok") is True else 1
    print(f"hq send {name} to {site}: no answer: {last}", file=err)
    return 3

