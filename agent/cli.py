"""The ``edge-agent`` command line (CONTRACT 2).

Exit codes: 0 ok; 1 degraded (``status``) or a runtime failure; 2 invalid
config or usage; 3 the daemon is not reachable (``status``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from agent import __version__
from agent.config import (
    AgentConfig,
    HqReceiverConfig,
    config_path,
    load_agent_config,
    load_hq_config,
)
from agent.errors import AgentError, ConfigError

EXIT_OK, EXIT_DEGRADED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $EDGE_AGENT_CONFIG, else "
                        "/etc/edge-agent/agent.toml)")
    common.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    sub.add_parser("check-config", parents=[common], help="validate the config and exit")
    status = sub.add_parser("status", parents=[common], help="ask the running daemon")
    status.add_argument("--json", action="store_true", help="print the raw status JSON")

    outbox = sub.add_parser("outbox", help="inspect the outbox files (daemon may be stopped)")
    osub = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    osub.add_parser("stats", parents=[common], help="depth, bytes, oldest age per kind")
    peek = osub.add_parser("peek", parents=[common], help="print the oldest pending events")
    peek.add_argument("--kind", help="only this kind")
    peek.add_argument("-n", type=int, default=10, help="how many (default 10)")
    export = osub.add_parser("export", parents=[common],
                             help="every pending event as JSON lines, in (kind, seq) order")
    export.add_argument("--output", "-o", help="file to write (default: stdout)")

    hq = sub.add_parser("hq", parents=[common], help="run the HQ receiver (CONTRACT 8)")
    hsub = hq.add_subparsers(dest="action", metavar="ACTION")
    report = hsub.add_parser("report", parents=[common],
                             help="per site and kind: received, seq range, gaps, duplicates")
    report.add_argument("--site", help="only this site")
    report.add_argument("--since", help="only events since this date (ISO 8601)")
    report.add_argument("--date", help="only events of this day (YYYY-MM-DD), each site's "
                        "local day from [[hq.sites]] timezone (UTC if unregistered), by state")
    report.add_argument("--json", action="store_true")
    fleet = hsub.add_parser("fleet", parents=[common],
                            help="one row per site: online/offline/silent/never-seen, backlog, "
                                 "devices down, alarms")
    fleet.add_argument("--json", action="store_true")
    send = hsub.add_parser("send", parents=[common],
                           help="send P/commands/NAME to a site and print its result")
    send.add_argument("name", metavar="NAME", help="the command, e.g. catalog-put")
    send.add_argument("--site", required=True, help="the site's id")
    send_args = send.add_mutually_exclusive_group(required=True)
    send_args.add_argument("--args", help="the command's args, a JSON object")
    send_args.add_argument("--args-file", help="a file holding the args JSON object")
    send.add_argument("--timeout", type=float, default=15.0,
                      help="seconds to wait for the result (default 15)")
    site_key = hsub.add_parser("site-key", parents=[common],
                               help="print a site's key (for its mqtt.hq_key_file), derived "
                                    "from hq.master_key_file")
    site_key.add_argument("site", metavar="SITE", help="the site id")
    metrc = hsub.add_parser("metrc", help="Metrc reporting: status, retry (CONTRACT 9)")
    msub = metrc.add_subparsers(dest="metrc_action", required=True, metavar="ACTION")
    mstatus = msub.add_parser("status", parents=[common],
                              help="per site: reported, pending, failed (with Metrc's "
                                   "message), overdue; exit 1 when any failed or overdue")
    mstatus.add_argument("--site", help="only this site")
    mstatus.add_argument("--date", help="only events of this day (YYYY-MM-DD, the site's "
                         "local day)")
    mstatus.add_argument("--json", action="store_true")
    mretry = msub.add_parser("retry", parents=[common],
                             help="re-queue failed events once the cause is fixed")
    which = mretry.add_mutually_exclusive_group(required=True)
    which.add_argument("--event", help="one event id")
    which.add_argument("--site", help="a site (with --failed: all its failed events)")
    mretry.add_argument("--failed", action="store_true", help="with --site: every failed one")
    mretry.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the outcome (exit 0 only if all reported)")

    preview = sub.add_parser("print-preview", parents=[common],
                             help="render a receipt or label to a PNG file, printing nothing")
    doc = preview.add_mutually_exclusive_group(required=True)
    doc.add_argument("--sale", metavar="FILE", help="a sale JSON file (the event's data)")
    doc.add_argument("--label", metavar="FILE", help="a label JSON file (the API's label body)")
    preview.add_argument("--printer", help="use this [[devices]] printer's options "
                         "(paper width, label size, DPI, header and warning text)")
    preview.add_argument("--output", "-o", help="PNG to write (default: FILE with .png)")

    devices = sub.add_parser("devices", parents=[common],
                             help="configured devices and network printers found over mDNS")
    devices.add_argument("--seconds", type=float, default=3.0,
                         help="how long to listen for printers (default 3)")
    devices.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    path = config_path(getattr(args, "config", None))
    try:
        if args.command == "check-config":
            return _check_config(path)
        if args.command == "run":
            from agent.daemon import run

            # State files (outbox, journals, sessions, print jobs) are for the service
            # user only, also outside the unit (which sets UMask=0077 itself).
            os.umask(0o077)
            return run(validated_config(path))
        if args.command == "status":
            return _status(load_agent_config(path), args.json)
        if args.command == "outbox":
            return _outbox(load_agent_config(path), args)
        if args.command == "hq":
            return _hq(path, args)
        if args.command == "print-preview":
            return _print_preview(path, args)
        if args.command == "devices":
            return _devices(load_agent_config(path), args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return EXIT_CONFIG


def validated_config(path: str) -> AgentConfig:
    """Load ``path`` and check everything ``run`` depends on, as one list of issues.

    ``check-config`` and ``run`` share it, so the daemon refuses to start on
    exactly the messages ``check-config`` prints (exit 2 either way).
    """
    from agent.auth import Tokens
    from agent.errors import ConfigIssue
    from agent.services import config_issues

    cfg = load_agent_config(path)
    issues: list[ConfigIssue] = []
    try:
        Tokens.load(cfg.api.tokens_file)
    except ConfigError as exc:
        issues.extend(ConfigIssue(f"api.tokens_file{'.' + i.path if i.path else ''}", i.message)
                      for i in exc.issues)
    except AgentError as exc:
        issues.append(ConfigIssue("api.tokens_file", str(exc)))
    issues.extend(config_issues(cfg))
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        value = getattr(cfg.mqtt, key)
        if value and not _readable(value):
            issues.append(ConfigIssue(f"mqtt.{key}", f"cannot read {value}"))
    from agent.config_checks import mqtt_issues

    issues.extend(mqtt_issues(cfg.mqtt))
    if cfg.mqtt.hq_key_file:
        from agent.proof import KeyFileError, read_site_key

        try:
            read_site_key(cfg.mqtt.hq_key_file)
        except KeyFileError as exc:
            issues.append(ConfigIssue("mqtt.hq_key_file", str(exc).split(": ", 1)[1]))
    if issues:
        raise ConfigError(path, issues)
    return cfg


def _check_config(path: str) -> int:
    cfg = validated_config(path)
    print(f"{path}: valid (site {cfg.site.id}, {len(cfg.devices)} devices)")
    return EXIT_OK


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _status(cfg: AgentConfig, as_json: bool) -> int:
    from agent.auth import Tokens

    host = "127.0.0.1" if cfg.api.bind in ("0.0.0.0", "::", "") else cfg.api.bind  # noqa: S104
    url = f"http://{host}:{cfg.api.port}/v1/status"
    token = Tokens.load(cfg.api.tokens_file).local_token()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - loopback URL
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"edge-agent: daemon not reachable at {url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return EXIT_OK if status.get("state") == "healthy" else EXIT_DEGRADED


def format_status(status: dict[str, Any]) -> str:
    up = status.get("uplink", {})
    box = status.get("outbox", {})
    lines = [
        f"site {status.get('site')}  edge-agent {status.get('version')}  "
        f"state {status.get('state')}",
        *(f"  ! {reason}" for reason in status.get("reasons", [])),
        f"uplink  {up.get('state')}  host {up.get('host') or '-'}  acks {up.get('acks', 0)}  "
        f"resends {up.get('resends', 0)}  reconnects {up.get('reconnects', 0)}",
        f"outbox  {box.get('state')}  {box.get('bytes', 0)} of {box.get('max_bytes', 0)} bytes",
        f"  {'kind':<8} {'depth':>8} {'bytes':>12} {'oldest':>10} {'seq range':>20}",
    ]
    for kind, k in (box.get("kinds") or {}).items():
        age = k.get("oldest_age_s")
        seqs = f"{k.get('first_seq') or '-'}..{k.get('last_seq') or 0}"
        lines.append(f"  {kind:<8} {k.get('depth', 0):>8} {k.get('bytes', 0):>12} "
                     f"{_age(age):>10} {seqs:>20}")
    devices = status.get("devices") or []
    lines.append(f"devices {len(devices)}")
    for device in devices:
        lines.append(f"  {device.get('id'):<24} {device.get('type', ''):<16} "
                     f"{device.get('state')}  {device.get('last_fault') or ''}")
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _outbox(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.outbox import Outbox

    view = Outbox.inspect(cfg.outbox.path)
    try:
        if args.action == "stats":
            import dataclasses

            now = time.time()
            kinds = {}
            for kind, k in view.stats().items():
                row = dataclasses.asdict(k)
                row["oldest_age_s"] = None if k.oldest_ts is None else round(now - k.oldest_ts, 3)
                kinds[kind] = row
            print(json.dumps({"path": cfg.outbox.path, "kinds": kinds}, indent=2))
        elif args.action == "peek":
            for env in view.peek(args.kind, args.n):
                print(json.dumps(env))
        elif args.action == "export":
            if args.output:
                with open(args.output, "w", encoding="utf-8") as out:
                    count = view.export(out)
                print(f"exported {count} events to {args.output}", file=sys.stderr)
            else:
                view.export(sys.stdout)
    finally:
        view.close()
    return EXIT_OK


def _hq(path: str, args: argparse.Namespace) -> int:
    cfg = load_hq_config(path)
    if args.action == "report":
        from agent.hq.report import report_main

        return report_main(cfg, args.site, args.since, args.json, date=args.date)
    if args.action == "fleet":
        from agent.hq.fleet_cli import fleet_main

        return fleet_main(cfg, args.json)
    if args.action == "send":
        from agent.hq.fleet_cli import send_main

        return send_main(cfg, args.name, args.site, args.args, args.args_file,
                         timeout=args.timeout)
    if args.action == "site-key":
        return _site_key(cfg, args.site)
    if args.action == "metrc":
        from agent.hq.metrc.cli import retry_main, status_main

        if args.metrc_action == "status":
            return status_main(cfg, args.site, args.date, args.json)
        return retry_main(cfg, args.event, args.site, args.failed, args.wait)
    import signal

    from agent import sdnotify
    from agent.hq.metrics import HqMetrics
    from agent.hq.receiver import HqReceiver
    from agent.hq.web import start_web

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics = HqMetrics()
    receiver = HqReceiver(cfg, metrics=metrics)
    worker = threading.Thread(target=receiver.run, args=(stop,), name="hq-receiver")
    worker.start()
    web = start_web(cfg, receiver, metrics)
    forwarder = _start_metrc(cfg, metrics)
    retention = None
    if cfg.hq.retention_days > 0 and cfg.hq.store.startswith("sqlite:"):
        from agent.hq.retention import RetentionRunner, retention_sinks

        retention = RetentionRunner(cfg.hq.store, cfg.hq.retention_days, retention_sinks(cfg))
        retention.start()
    # systemd: READY=1 once subscribed; watchdog pings only while the receiver runs.
    interval = sdnotify.watchdog_interval()
    announced = False
    while worker.is_alive() and not stop.is_set():
        if not announced and receiver.subscribed.is_set():
            sdnotify.ready(f"subscribed to {receiver.topic}")
            announced = True
        if interval:
            sdnotify.watchdog()
        stop.wait(min(0.2 if not announced else 1.0, interval / 2 if interval else 1.0))
    sdnotify.stopping()
    stop.set()
    if web is not None:
        web.stop()
    if retention is not None:
        retention.stop()
    if forwarder is not None:
        forwarder.stop()
    worker.join(10)
    if receiver.fatal is not None:   # logged by the receiver; systemd restarts us
        return EXIT_DEGRADED
    return EXIT_OK


def _start_metrc(cfg: HqReceiverConfig, metrics: Any) -> Any:
    """The Metrc forwarder when ``[metrc] enabled``; None (logged) when it cannot run:
    the receiver keeps storing, and ``hq metrc status`` shows the sales waiting."""
    if not cfg.metrc.enabled:
        return None
    from agent.hq.metrc.forwarder import Forwarder, ForwarderError
    from agent.hq.store import StoreError

    try:
        forwarder = Forwarder(cfg, registry=metrics.registry)
    except (ForwarderError, StoreError) as exc:
        logging.getLogger("agent.hq.metrc").error(
            "metrc: not forwarding to Metrc: %s (sales are stored and wait)", exc)
        return None
    forwarder.start()
    return forwarder


def _site_key(cfg: HqReceiverConfig, site: str) -> int:
    """Print the site's key: 64 hex digits, the whole content of its mqtt.hq_key_file."""
    from agent.config import SITE_ID_RE
    from agent.proof import derive_site_key, read_master_key

    if not SITE_ID_RE.match(site):
        print(f"edge-agent: SITE: {site[:64]!r} is not a site id ([a-z0-9-]{{1,64}})",
              file=sys.stderr)
        return EXIT_CONFIG
    if not cfg.hq.master_key_file:
        print("edge-agent: hq.master_key_file: not set; HQ needs its master secret to derive "
              "site keys", file=sys.stderr)
        return EXIT_CONFIG
    print(derive_site_key(read_master_key(cfg.hq.master_key_file), site).hex())
    return EXIT_OK


def _print_preview(path: str, args: argparse.Namespace) -> int:
    from agent.printing import preview_main

    kind = "receipt" if args.sale else "label"
    return preview_main(lambda: load_agent_config(path), kind, args.sale or args.label,
                        args.printer, args.output)


def _devices(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.discovery import devices_main
    from agent.hardware import format_inventory, inventory

    configured = [d.model_dump(include={"id", "type", "url", "enabled"}) for d in cfg.devices]
    local = inventory()
    if not args.json:
        print(format_inventory(local))
    return devices_main(configured, cfg.api.advertise_interfaces, args.seconds, args.json,
                        extra={"local": local})


if __name__ == "__main__":
    sys.exit(main())
