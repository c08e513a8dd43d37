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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from agent import __version__
from agent.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DEFAULT_HQ_CONFIG_PATH,
    AgentConfig,
    MqttConfig,
    SettingsBase,
    blame_env,
    config_path,
    env_names,
    load_agent_config,
    load_config,
)
from agent.errors import AgentError, ConfigError, ConfigIssue
from agent.kinds import KINDS
from agent.ops.install import Resolve, under

if TYPE_CHECKING:
    from hq.config import HqReceiverConfig

_C = TypeVar("_C", bound=SettingsBase)

EXIT_OK, EXIT_DEGRADED, EXIT_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3
# --root's default: an image build (or the README test) sets it once for every command.
ROOT_ENV = "EDGE_AGENT_ROOT"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file (default: $EDGE_AGENT_CONFIG, else "
                        "/etc/edge-agent/agent.toml)")
    common.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --root DIR: the box's files under DIR (an image being built, a test), as
    # `systemctl --root` has it; paths inside the files stay the box's own.
    rooted = argparse.ArgumentParser(add_help=False)
    rooted.add_argument("--root", default=os.environ.get(ROOT_ENV, ""), metavar="DIR",
                        help="read (and write) the box's files under DIR (default: "
                             f"${ROOT_ENV}, else /); the default --config is then DIR/etc/...")

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    sub.add_parser("check-config", parents=[common, rooted],
                   help="validate the config (a site's or HQ's) and exit")
    install = sub.add_parser("install", parents=[common, rooted],
                             help="lay out /etc/edge-agent, the unit, udev rules and sysusers, "
                                  "then check the config")
    install.add_argument("--dry-run", action="store_true",
                         help="write nothing; show what would be written and check it")
    install.add_argument("--bundle", metavar="DIR",
                         help="the site's bundle from 'edge-agent hq pki issue SITE' "
                              "(certificate, key, CA, proof key, broker address)")
    install.add_argument("--site", help="site.id (default: the bundle's)")
    install.add_argument("--name", help="site.name (default: the bundle's)")
    install.add_argument("--timezone", help="site.timezone, an IANA name (default: the bundle's)")
    install.add_argument("--broker", action="append", metavar="HOST",
                         help="an mqtt.hosts entry (repeat for failover; default: the bundle's)")
    install.add_argument("--force", action="store_true",
                         help="overwrite the config, tokens and keys too (never the default)")
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
    export.add_argument("--kind", choices=KINDS, help="only this kind")
    export.add_argument("--since", help="only events accepted at or after this ISO 8601 "
                        "date or time (e.g. 2026-11-22 or 2026-11-22T06:00:00-07:00; UTC "
                        "if no offset)")

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
    hsub.add_parser("check-config", parents=[common, rooted],
                    help="validate the HQ config and exit")
    hinstall = hsub.add_parser("install", parents=[common, rooted],
                               help="lay out /etc/edge-agent-hq (config, tokens, master key, "
                                    "CA and certificates), the unit, then check the config")
    hinstall.add_argument("--dry-run", action="store_true",
                          help="write nothing; show what would be written and check it")
    hinstall.add_argument("--broker", action="append", metavar="HOST",
                          help="the broker's host name (repeat for a cluster); also the "
                               "broker certificate's names")
    hinstall.add_argument("--port", type=int, help="mqtt.port (default 8883)")
    hinstall.add_argument("--force", action="store_true",
                          help="overwrite the config, tokens and keys too (never the default)")
    pki = hsub.add_parser("pki", help="HQ's certificate authority for the broker, HQ and sites")
    psub = pki.add_subparsers(dest="pki_action", required=True, metavar="ACTION")
    pinit = psub.add_parser("init", parents=[common, rooted],
                            help="make the CA (pki/ beside the HQ config), HQ's client "
                                 "certificate and the broker's server certificate")
    pinit.add_argument("--broker", action="append", metavar="HOST",
                       help="a name the broker is reached by (default: mqtt.hosts)")
    pinit.add_argument("--days", type=int, help="the CA's lifetime (default 3650)")
    pissue = psub.add_parser("issue", parents=[common, rooted],
                             help="a site's bundle: certificate and key, CA, proof key, "
                                  "broker ACL lines")
    pissue.add_argument("site", metavar="SITE", help="the site id (the certificate's CN)")
    pissue.add_argument("--out", "-o", metavar="DIR", help="bundle directory (default ./SITE)")
    pissue.add_argument("--broker", action="append", metavar="HOST",
                        help="the broker address the site uses (default: HQ's mqtt.hosts)")
    pissue.add_argument("--days", type=int, help="the certificate's lifetime (default 825)")

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


# The exit status of a Unix tool killed by SIGPIPE (128 + 13), what `| head` expects.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    """The command line; a reader that goes away (``edge-agent hq report --json | head``)
    ends it quietly, as SIGPIPE ends a C tool, instead of with a traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()   # inside the try: the last buffered line may be the one refused
        return code
    except BrokenPipeError:
        # Python ignores SIGPIPE, so the write raised instead; point stdout at /dev/null so
        # the interpreter's own flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from agent import logs

    logs.setup(getattr(args, "log_level", "INFO"))
    default = DEFAULT_HQ_CONFIG_PATH if args.command == "hq" else DEFAULT_CONFIG_PATH
    root = getattr(args, "root", "") or ""
    explicit = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    path = explicit or (under(root, default) if root else config_path(None, default))
    try:
        if args.command == "check-config":
            return _check_config(path, root)
        if args.command == "install":
            return _install(args, root)
        if args.command == "run":
            from agent.daemon import run

            # State files (outbox, journals, sessions, print jobs) are for the service
            # user only, also outside the unit (which sets UMask=0077 itself).
            os.umask(0o077)
            cfg = validated_config(path)
            logs.setup(args.log_level, cfg.log.format)
            return run(cfg)
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


def validated_config(path: str, resolve: Resolve | None = None) -> AgentConfig:
    """Load ``path`` and check everything ``run`` depends on, as one list of issues.

    ``check-config`` and ``run`` share it, so the daemon refuses to start on
    exactly the messages ``check-config`` prints (exit 2 either way). With
    ``resolve`` (``--root``), the files the config names are read where it says.
    """
    from agent.devices.family import config_issues

    def checks(cfg: AgentConfig, dropped: frozenset[str]) -> list[ConfigIssue]:
        later: list[ConfigIssue] = []
        if "api" not in dropped:
            later.extend(_tokens_file_issues("api.tokens_file", cfg.api.tokens_file))
        later.extend(config_issues(cfg))
        if "mqtt" not in dropped:
            later.extend(_unreadable_mqtt_files(cfg.mqtt))
            from agent.ops.config_checks import mqtt_issues

            later.extend(mqtt_issues(cfg.mqtt))
            if cfg.mqtt.hq_key_file:
                from agent.proof import KeyFileError, read_site_key

                try:
                    read_site_key(cfg.mqtt.hq_key_file)
                except KeyFileError as exc:
                    later.append(ConfigIssue("mqtt.hq_key_file", str(exc).split(": ", 1)[1]))
        return later

    return _validated(path, AgentConfig, resolve, checks)


def validated_hq_config(path: str, resolve: Resolve | None = None) -> HqReceiverConfig:
    """Load an HQ config and check the files the receiver reads, as one list of issues."""
    from agent.proof import KeyFileError, read_master_key
    from hq.config import HqReceiverConfig

    def checks(cfg: HqReceiverConfig, dropped: frozenset[str]) -> list[ConfigIssue]:
        later: list[ConfigIssue] = []
        if "mqtt" not in dropped:
            later.extend(_unreadable_mqtt_files(cfg.mqtt,
                                                hint=" (edge-agent hq pki init makes it)"))
        if "hq" not in dropped:
            if cfg.hq.master_key_file:
                try:
                    read_master_key(cfg.hq.master_key_file)
                except KeyFileError as exc:
                    later.append(ConfigIssue("hq.master_key_file",
                                             str(exc).split(": ", 1)[1]))
            if cfg.hq.http_port:
                later.extend(_tokens_file_issues("hq.tokens_file", cfg.hq.tokens_file))
        return later

    return _validated(path, HqReceiverConfig, resolve, checks)


def _validated(path: str, cls: type[_C], resolve: Resolve | None,
               checks: Callable[[_C, frozenset[str]], list[ConfigIssue]]) -> _C:
    """Load ``path`` as ``cls`` and run ``checks`` (files, drivers) on it: every problem
    in one pass, the checks on what did validate (the sections left out are ``dropped``),
    a value from the environment named by its variable."""
    from agent.ops.install import rooted

    try:
        cfg = load_config(path, cls, rooted(resolve) if resolve else None)
        issues: list[ConfigIssue] = []
        dropped: frozenset[str] = frozenset()
    except ConfigError as exc:
        if not isinstance(exc.partial, cls):
            raise
        cfg, issues, dropped = exc.partial, list(exc.issues), exc.dropped
    issues.extend(blame_env(checks(cfg, dropped), env_names(cls)))
    if issues:
        raise ConfigError(path, issues)
    return cfg


def _unreadable_mqtt_files(mqtt: MqttConfig, hint: str = "") -> list[ConfigIssue]:
    """``mqtt.*_file`` keys naming a file this process cannot read (``hint`` after the
    certificate and key files' message: where they come from)."""
    issues = []
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        value = getattr(mqtt, key)
        if value and not _readable(value):
            where = hint if key != "password_file" else ""
            issues.append(ConfigIssue(f"mqtt.{key}", f"cannot read {value}{where}"))
    return issues


def _tokens_file_issues(key: str, path: str) -> list[ConfigIssue]:
    """What is wrong with a tokens file (``api.tokens_file``, ``hq.tokens_file``), named by
    ``key`` and, inside the file, by the token's line."""
    from agent.web.auth import Tokens

    try:
        Tokens.load(path)
    except ConfigError as exc:
        return [ConfigIssue(f"{key}{'.' + i.path if i.path else ''}", i.message)
                for i in exc.issues]
    except AgentError as exc:
        return [ConfigIssue(key, str(exc))]
    return []


def _is_hq_file(path: str) -> bool:
    """A file with ``[hq]`` and no ``[site]`` is an HQ receiver's config."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False   # load_*_config reports it
    return "site" not in data and "hq" in data


def site_summary(path: str, resolve: Resolve | None = None) -> str:
    cfg = validated_config(path, resolve)
    return f"valid (site {cfg.site.id}, {len(cfg.devices)} devices)"


def hq_summary(path: str, resolve: Resolve | None = None) -> str:
    cfg = validated_hq_config(path, resolve)
    store = cfg.hq.store.split(":", 1)[0]
    return f"valid (HQ receiver, {store} store, {len(cfg.hq.sites)} registered sites)"


def _check_config(path: str, root: str = "", hq: bool | None = None) -> int:
    from agent.ops.install import resolver

    resolve = resolver(root) if root else None
    summary = hq_summary if (_is_hq_file(path) if hq is None else hq) else site_summary
    print(f"{path}: {summary(path, resolve)}")
    return EXIT_OK


def _install(args: argparse.Namespace, root: str) -> int:
    from agent.ops import install

    bundle = install.Bundle.read(args.bundle) if args.bundle else None
    plan = install.site_plan(site=args.site, name=args.name, timezone=args.timezone,
                             hosts=args.broker, bundle=bundle,
                             exec_path=install.console_script(root))
    after = [] if bundle else ["get this site's bundle at HQ: edge-agent hq pki issue SITE; "
                               "then: edge-agent install --bundle DIR"]
    if not root or root == "/":
        after += ["udevadm control --reload && udevadm trigger",
                  "systemctl restart systemd-modules-load",
                  "systemctl daemon-reload && systemctl enable --now edge-agent",
                  "edge-agent status"]
    return install.run_install(plan, root=root, dry_run=args.dry_run,
                               config=install.SITE_CONFIG, check=site_summary,
                               title="edge-agent install", after=after, force=args.force)


def _readable(path: str) -> bool:
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


def _status(cfg: AgentConfig, as_json: bool) -> int:
    from agent.web.auth import Tokens

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
        f"outbox  {box.get('state')}  {human_bytes(box.get('bytes', 0))} of "
        f"{human_bytes(box.get('max_bytes', 0))}{_drain_line(box)}",
        f"  {'kind':<8} {'depth':>8} {'size':>10} {'oldest':>10} {'pending seqs':>22} "
        f"{'sending':>10} {'empty in':>9}",
    ]
    drains = (box.get("drain") or {}).get("kinds") or {}
    for kind, k in (box.get("kinds") or {}).items():
        age = k.get("oldest_age_s")
        last = k.get("last_seq") or 0
        # An empty queue has no range: say so, with the last seq it had.
        seqs = (f"{k.get('first_seq')}..{last}" if k.get("depth") and k.get("first_seq")
                else f"none (last {last})" if last else "none")
        drain = drains.get(kind) or {}
        rate = drain.get("rate_eps")
        sending = _rate(rate) if k.get("depth") and rate else "-"
        empty = _age(drain.get("eta_s")) if k.get("depth") and rate else "-"
        lines.append(f"  {kind:<8} {k.get('depth', 0):>8} {human_bytes(k.get('bytes', 0)):>10} "
                     f"{_age(age):>10} {seqs:>22} {sending:>10} {empty:>9}")
    devices = status.get("devices") or []
    lines.append(f"devices {len(devices)}")
    for device in devices:
        lines.append(f"  {device.get('id'):<24} {device.get('type', ''):<16} "
                     f"{device.get('state')}  {device.get('last_fault') or ''}")
    return "\n".join(lines)


def _rate(eps: float) -> str:
    return f"{eps:.0f}/s" if eps >= 10 else f"{eps:.1f}/s"


def _drain_line(box: dict[str, Any]) -> str:
    """``  draining 250/s, empty in 4m`` while acks empty a backlog; else nothing."""
    drain = box.get("drain") or {}
    rate = drain.get("rate_eps")
    depth = sum(int((k or {}).get("depth") or 0) for k in (box.get("kinds") or {}).values())
    if not depth or not isinstance(rate, int | float) or rate <= 0:
        return ""
    return f"  draining {_rate(rate)}, empty in {_age(drain.get('eta_s'))}"


def human_bytes(n: int | float | None) -> str:
    """``n`` bytes in binary units for people: ``575 B``, ``1.5 MiB``, ``1.0 GiB``."""
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
            since = None
            if args.since:
                from hq.store import parse_time

                try:
                    since = parse_time(args.since).timestamp()
                except ValueError:
                    print(f"edge-agent: --since {args.since!r}: not an ISO 8601 date or time "
                          "(e.g. 2026-11-22 or 2026-11-22T06:00:00-07:00)", file=sys.stderr)
                    return EXIT_CONFIG
            # A bar only for a person watching: never into a pipe or a log file.
            bar = ProgressBar(sys.stderr, "exporting") if sys.stderr.isatty() else None
            progress = bar.update if bar else None
            try:
                if args.output:
                    with open(args.output, "w", encoding="utf-8") as out:
                        count = view.export(out, kind=args.kind, since=since,
                                            progress=progress)
                else:
                    count = view.export(sys.stdout, kind=args.kind, since=since,
                                        progress=progress)
            finally:
                if bar:
                    bar.finish()
            if args.output:
                print(f"exported {count} events to {args.output}", file=sys.stderr)
    finally:
        view.close()
    return EXIT_OK


class ProgressBar:
    """``exporting [#####.....]  52%  5,200 of 10,000`` on one terminal line, redrawn
    at most ten times a second (and at the end)."""

    WIDTH = 30

    def __init__(self, stream: TextIO, label: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.label = label
        self._clock = clock
        self._drawn_at = -1.0
        self._last: tuple[int, int] | None = None

    def update(self, done: int, total: int) -> None:
        self._last = (done, total)
        now = self._clock()
        if done >= total or now - self._drawn_at >= 0.1:
            self._drawn_at = now
            self._draw(done, total)

    def _draw(self, done: int, total: int) -> None:
        share = 1.0 if total <= 0 else min(1.0, done / total)
        filled = int(share * self.WIDTH)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                          f"{share:4.0%}  {done:,} of {total:,}")
        self.stream.flush()

    def finish(self) -> None:
        if self._last is not None:
            self._draw(*self._last)
            self.stream.write("\n")
            self.stream.flush()


def _hq(path: str, args: argparse.Namespace) -> int:
    root = getattr(args, "root", "") or ""
    if args.action == "check-config":
        return _check_config(path, root, hq=True)
    if args.action == "install":
        return _hq_install(args, root)
    if args.action == "pki":
        return _pki(path, args, root)
    from hq.config import load_hq_config

    cfg = load_hq_config(path)
    if args.action == "report":
        from hq.report import report_main

        return report_main(cfg, args.site, args.since, args.json, date=args.date)
    if args.action == "fleet":
        from hq.fleet_cli import fleet_main

        return fleet_main(cfg, args.json)
    if args.action == "send":
        from hq.fleet_cli import send_main

        return send_main(cfg, args.name, args.site, args.args, args.args_file,
                         timeout=args.timeout)
    if args.action == "site-key":
        return _site_key(cfg, args.site)
    if args.action == "metrc":
        from hq.metrc.cli import retry_main, status_main

        if args.metrc_action == "status":
            return status_main(cfg, args.site, args.date, args.json)
        return retry_main(cfg, args.event, args.site, args.failed, args.wait)
    import signal

    from agent import logs
    from agent.ops import sdnotify

    logs.setup(args.log_level, cfg.log.format)
    from hq.metrics import HqMetrics
    from hq.receiver import HqReceiver
    from hq.web import start_web

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
    if cfg.hq.retention_days > 0:
        from hq.retention import RetentionRunner, retention_sinks

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
    from hq.metrc.forwarder import Forwarder, ForwarderError
    from hq.store import StoreError

    try:
        forwarder = Forwarder(cfg, registry=metrics.registry)
    except (ForwarderError, StoreError) as exc:
        logging.getLogger("hq.metrc").error(
            "metrc: not forwarding to Metrc: %s (sales are stored and wait)", exc)
        return None
    forwarder.start()
    return forwarder


def _hq_install(args: argparse.Namespace, root: str) -> int:
    import datetime as dt

    from agent.ops import install
    from hq import pki

    plan = install.hq_plan(hosts=args.broker, port=args.port,
                           exec_path=install.console_script(root))
    hosts = args.broker or ["hq-broker.example.com"]
    pki_dir = install.pki_dir_for(install.HQ_CONFIG)
    if os.path.exists(under(root, f"{pki_dir}/ca.key")):
        print(f"  (the CA in {pki_dir} exists: kept, with the certificates it signed)")
    else:
        # The example config's [mqtt] files: HQ's client certificate and the CA.
        plan += pki.pki_init_plan(pki_dir, {"ca_file": "/etc/edge-agent-hq/ca.pem",
                                                "cert_file": "/etc/edge-agent-hq/hq.pem",
                                                "key_file": "/etc/edge-agent-hq/hq.key"},
                                      hosts, dt.datetime.now(dt.UTC))
    after = [f"the broker: {pki_dir}/broker/ (ca.pem, server.pem, server.key) and "
             f"{install.SHARE}/mosquitto/ to /etc/mosquitto/ (see README: The broker)",
             "each site: edge-agent hq pki issue SITE, then on its box: "
             "edge-agent install --bundle SITE/"]
    if not root or root == "/":
        after += ["systemctl daemon-reload && systemctl enable --now edge-agent-hq"]
    return install.run_install(plan, root=root, dry_run=args.dry_run, config=install.HQ_CONFIG,
                               check=hq_summary, title="edge-agent hq install", after=after,
                               force=args.force)


def _pki(path: str, args: argparse.Namespace, root: str) -> int:
    import datetime as dt

    from agent.config import SITE_ID_RE
    from agent.ops import install
    from agent.proof import derive_site_key, read_master_key
    from hq import pki
    from hq.config import load_hq_config

    resolve = install.resolver(root)
    cfg = load_hq_config(path)
    pki_dir = install.pki_dir_for(path)
    now = dt.datetime.now(dt.UTC)
    if args.pki_action == "init":
        if os.path.exists(os.path.join(pki_dir, "ca.key")):
            print(f"edge-agent: {pki_dir}/ca.key exists: the fleet has its CA (a new one would "
                  "orphan every site's certificate)", file=sys.stderr)
            return EXIT_CONFIG
        files = {k: getattr(cfg.mqtt, k) for k in ("ca_file", "cert_file", "key_file")}
        plan = pki.pki_init_plan(install.box_path(pki_dir, root), files,
                                     args.broker or cfg.mqtt.hosts, now, days=args.days)
        outcome = install.write_plan(plan, root, dry_run=False)
        print("\n".join(outcome.lines + [f"  next: {s}" for s in outcome.next_steps]))
        return EXIT_OK
    site = args.site
    if not SITE_ID_RE.match(site) or site == pki.HQ_CN:
        print(f"edge-agent: SITE: {site[:64]!r} is not a site id ([a-z0-9-]{{1,64}}, not "
              f"{pki.HQ_CN!r})", file=sys.stderr)
        return EXIT_CONFIG
    try:
        ca = pki.KeyPair(Path(pki_dir, "ca.pem").read_bytes(),
                         Path(pki_dir, "ca.key").read_bytes())
    except OSError as exc:
        print(f"edge-agent: cannot read the CA in {pki_dir} ({exc.strerror}); make it with "
              "'edge-agent hq pki init'", file=sys.stderr)
        return EXIT_CONFIG
    key = None
    if cfg.hq.master_key_file:
        key = derive_site_key(read_master_key(resolve(cfg.hq.master_key_file)), site)
    else:
        print("edge-agent: hq.master_key_file is not set: the bundle has no hq-proof.key, and "
              "the site will take acks and commands unproven", file=sys.stderr)
    registered = {s.id: s for s in cfg.hq.sites}.get(site)
    meta = {"site": site, "name": registered.name if registered else "",
            "timezone": registered.timezone if registered else "UTC",
            "hosts": args.broker or list(cfg.mqtt.hosts), "port": cfg.mqtt.port,
            "topic_prefix": cfg.mqtt.topic_prefix}
    acl = pki.site_acl(site, cfg.mqtt.topic_prefix,
                       install.data_text("config/mosquitto/edge-agent.acl"))
    out = os.path.abspath(args.out or site)
    plan = pki.bundle_plan(out, site=site, ca=ca, now=now, proof_key=key, meta=meta,
                               acl=acl, days=args.days)
    os.makedirs(out, mode=0o700, exist_ok=True)
    outcome = install.write_plan(plan, "", dry_run=False)
    print("\n".join(outcome.lines))
    print(f"broker ACL lines for {site} (the shipped edge-agent.acl's patterns already grant "
          "them):")
    print("\n".join(f"  {line}" for line in acl))
    print(f"on the box: edge-agent install --bundle {out}")
    return EXIT_OK


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
    from agent.devices.printing import preview_main

    kind = "receipt" if args.sale else "label"
    return preview_main(lambda: load_agent_config(path), kind, args.sale or args.label,
                        args.printer, args.output)


def _devices(cfg: AgentConfig, args: argparse.Namespace) -> int:
    from agent.devices.discovery import devices_main
    from agent.ops.hardware import format_inventory, inventory

    configured = [d.model_dump(include={"id", "type", "url", "enabled"}) for d in cfg.devices]
    local = inventory()
    if not args.json:
        print(format_inventory(local))
    return devices_main(configured, cfg.api.advertise_interfaces, args.seconds, args.json,
                        extra={"local": local})


if __name__ == "__main__":
    sys.exit(main())
