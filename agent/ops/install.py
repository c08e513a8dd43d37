"""Lay out what a box (``edge-agent install``) or HQ (``edge-agent hq install``) needs.

The wheel carries it all as package data under ``agent/data/`` (the example
configs, the systemd units, udev rules, sysusers and modules-load files, the
broker configs and sample documents; in the source tree these are symlinks to
``config/`` and ``systemd/``, so the repository keeps one copy). An install is
first a plan, a list of files with their modes (pure, so ``--dry-run`` shows
exactly what a real run writes), then written, then checked with
``check-config`` as the box will see it.

``--root DIR`` lays the files out under DIR the way ``systemctl --root`` and
``systemd-sysusers --root`` do (an image being built, a test): paths inside
the files stay the box's own (``/etc/edge-agent/...``), and the check reads
them under DIR. What an operator edits and every secret (configs, tokens,
keys, the CA) is never overwritten; units and rules are (they belong to the
package: change them with drop-ins).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError

SITE_CONFIG = "/etc/edge-agent/agent.toml"
HQ_CONFIG = "/etc/edge-agent-hq/hq.toml"
SITE_GROUP, HQ_GROUP = "edge-agent", "edge-agent-hq"
SHARE = "/usr/share/edge-agent"
UNIT_DIR = "/etc/systemd/system"
# The console script the shipped units name; an install points them at its own.
PACKAGED_EXEC = "/usr/bin/edge-agent"
BUNDLE_MANIFEST = "site.json"

Resolve = Callable[[str], str]


class InstallError(AgentError):
    """An install cannot go on (a bad bundle, an unwritable root); the message says why."""


def data_bytes(relative: str) -> bytes:
    """A file shipped in the package, e.g. ``config/agent.example.toml``."""
    node = resources.files("agent").joinpath("data", *relative.split("/"))
    try:
        return node.read_bytes()
    except OSError as exc:
        raise InstallError(f"the package lacks {relative} ({exc.strerror or exc}); "
                           "reinstall edge-agent") from None


def data_text(relative: str) -> str:
    return data_bytes(relative).decode("utf-8")


@dataclass(frozen=True)
class Planned:
    """One file an install writes: ``path`` as on the box."""

    path: str
    data: bytes = field(repr=False)
    mode: int = 0o644
    group: str | None = None    # owner root, this group: the service reads it through it
    keep: bool = False          # an existing file wins (what an operator edits, secrets)
    secret: bool = False        # never printed


def under(root: str, path: str) -> str:
    """``path`` (absolute, as on the box) under ``root`` ("" or "/": the box itself)."""
    if not root or root == "/":
        return path
    return os.path.join(root, path.lstrip("/"))


# --- Editing the shipped example configs (text, so their comments stay) -------------

def set_toml(text: str, section: str, key: str, value: Any) -> str:
    """``text`` with ``key``'s value in ``[section]`` replaced, its trailing comment kept."""
    lines = text.splitlines(keepends=True)
    current = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            current = stripped.strip("[]")
            continue
        if stripped.startswith("[["):
            current = stripped.strip("[]")
            continue
        match = re.match(rf"^(\s*{re.escape(key)}\s*=\s*)(\"[^\"]*\"|\[[^\]]*\]|[^#\s]+)(.*)$",
                         line.rstrip("\n"))
        if current == section and match:
            lines[i] = f"{match.group(1)}{json.dumps(value)}{match.group(3)}\n"
            return "".join(lines)
    raise InstallError(f"the shipped example config has no {section}.{key}")


def comment_from(text: str, marker: str, note: str) -> str:
    """Everything from the first line starting with ``marker`` on, commented out."""
    head, sep, tail = text.partition("\n" + marker)
    if not sep:
        return text
    body = (marker + tail).splitlines()
    return head + "\n" + note + "\n" + "\n".join(f"# {line}" if line else "#"
                                                 for line in body) + "\n"


def _token() -> str:
    return secrets.token_urlsafe(32)


def _exec_unit(unit: str, exec_path: str | None) -> str:
    if not exec_path or exec_path == PACKAGED_EXEC:
        return unit
    return unit.replace(f"ExecStart={PACKAGED_EXEC} ", f"ExecStart={exec_path} ")


def console_script(root: str = "") -> str | None:
    """This install's ``edge-agent`` (a venv's bin/, where pip put it), if there is one,
    as the box sees it (a venv inside ``root`` loses the root)."""
    beside = Path(sys.executable).parent / "edge-agent"
    found = str(beside) if beside.is_file() else shutil.which("edge-agent")
    return box_path(found, root) if found else None


def box_path(path: str, root: str) -> str:
    """``path`` on this machine as the box sees it: ``root`` stripped when inside it."""
    if root and root != "/":
        base, full = os.path.abspath(root), os.path.abspath(path)
        if full == base or full.startswith(base + os.sep):
            return "/" + os.path.relpath(full, base)
    return path


# --- What a site box gets -------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    """What ``edge-agent hq pki issue SITE`` wrote for one site (a directory)."""

    site: str
    name: str
    timezone: str
    hosts: list[str]
    port: int
    topic_prefix: str
    files: dict[str, bytes] = field(repr=False)   # ca.pem, site.pem, site.key, hq-proof.key

    @classmethod
    def read(cls, directory: str) -> Bundle:
        base = Path(directory)
        try:
            meta = json.loads((base / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
            files = {name: (base / name).read_bytes()
                     for name in ("ca.pem", "site.pem", "site.key", "hq-proof.key")
                     if (base / name).exists()}
            return cls(site=str(meta["site"]), name=str(meta.get("name", "")),
                       timezone=str(meta.get("timezone", "UTC")),
                       hosts=[str(h) for h in meta["hosts"]], port=int(meta["port"]),
                       topic_prefix=str(meta.get("topic_prefix", "edge")), files=files)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InstallError(f"--bundle {directory}: not a bundle from 'edge-agent hq pki "
                               f"issue SITE' ({type(exc).__name__}: {exc})") from None


def site_plan(*, site: str | None = None, name: str | None = None,
              timezone: str | None = None, hosts: list[str] | None = None,
              bundle: Bundle | None = None, exec_path: str | None = None) -> list[Planned]:
    """Every file a site box needs; command-line values win over the bundle's."""
    text = data_text("config/agent.example.toml")
    site = site or (bundle.site if bundle else None)
    name = name if name is not None else (bundle.name if bundle else None)
    timezone = timezone or (bundle.timezone if bundle else None)
    hosts = hosts or (bundle.hosts if bundle else None)
    for section, key, value in (("site", "id", site), ("site", "name", name),
                                ("site", "timezone", timezone), ("mqtt", "hosts", hosts)):
        if value is not None:
            text = set_toml(text, section, key, value)
    if bundle is not None:
        text = set_toml(text, "mqtt", "port", bundle.port)
        text = set_toml(text, "mqtt", "topic_prefix", bundle.topic_prefix)
    text = comment_from(text, "[[devices]]", "# The devices: 'edge-agent devices' lists the "
                        "serial ports, USB devices, keyboard\n# wedges and network printers "
                        "it finds, with the url to paste. Examples:")
    text = text.replace("# Copy to /etc/edge-agent/agent.toml and edit.",
                        "# Written by 'edge-agent install'; edit it.")
    tokens = ("# name token: one caller of the local API a line (edge-agent install).\n"
              "# 'cli' is what 'edge-agent status' uses; give each POS and tablet its own.\n"
              f"pos-1 {_token()}\ntablet-1 {_token()}\ncli {_token()}\n")
    plan = [
        Planned(SITE_CONFIG, text.encode(), 0o640, SITE_GROUP, keep=True),
        Planned("/etc/edge-agent/tokens", tokens.encode(), 0o640, SITE_GROUP, keep=True,
                secret=True),
        Planned(f"{UNIT_DIR}/edge-agent.service",
                _exec_unit(data_text("systemd/edge-agent.service"), exec_path).encode()),
        Planned("/etc/udev/rules.d/99-edge-agent.rules", data_bytes("systemd/99-edge-agent.rules")),
        Planned("/etc/sysusers.d/edge-agent.conf", data_bytes("systemd/edge-agent.sysusers")),
        Planned("/etc/modules-load.d/edge-agent.conf",
                data_bytes("systemd/edge-agent-modules.conf")),
        Planned("/usr/share/doc/edge-agent/README.md", data_bytes("README.md")),
        Planned(f"{SHARE}/samples/sale.json", data_bytes("config/samples/sale.json")),
        Planned(f"{SHARE}/samples/label.json", data_bytes("config/samples/label.json")),
    ]
    if bundle is not None:
        for name_, mode, group, secret in (("ca.pem", 0o644, None, False),
                                           ("site.pem", 0o644, None, False),
                                           ("site.key", 0o640, SITE_GROUP, True),
                                           ("hq-proof.key", 0o640, SITE_GROUP, True)):
            if name_ in bundle.files:
                plan.append(Planned(f"/etc/edge-agent/{name_}", bundle.files[name_], mode,
                                    group, keep=True, secret=secret))
    return plan


# --- What HQ gets ---------------------------------------------------------------------

def hq_plan(*, hosts: list[str] | None = None, port: int | None = None,
            exec_path: str | None = None) -> list[Planned]:
    """HQ's config, tokens, master key, unit and the broker configs to copy."""
    text = data_text("config/hq.example.toml")
    if hosts:
        text = set_toml(text, "mqtt", "hosts", hosts)
    if port:
        text = set_toml(text, "mqtt", "port", port)
    text = comment_from(text, "# The sites HQ expects", "# The sites HQ expects (a registered "
                        "site that never wrote is \"never-seen\"):\n# add one [[hq.sites]] "
                        "table per site. For example:")
    text = text.replace("Copy to /etc/edge-agent-hq/hq.toml.",
                        "Written by 'edge-agent hq install'; edit it.")
    plan = [
        Planned(HQ_CONFIG, text.encode(), 0o640, HQ_GROUP, keep=True),
        Planned("/etc/edge-agent-hq/tokens",
                f"# name token: who may sign in to the HQ page and call its API.\n"
                f"admin {_token()}\n".encode(), 0o640, HQ_GROUP, keep=True, secret=True),
        Planned("/etc/edge-agent-hq/master.key", (secrets.token_hex(32) + "\n").encode(),
                0o640, HQ_GROUP, keep=True, secret=True),
        Planned(f"{UNIT_DIR}/edge-agent-hq.service",
                _exec_unit(data_text("systemd/edge-agent-hq.service"), exec_path).encode()),
        Planned("/etc/sysusers.d/edge-agent.conf", data_bytes("systemd/edge-agent.sysusers")),
        Planned("/usr/share/doc/edge-agent/README.md", data_bytes("README.md")),
    ]
    for name in shipped_broker_files():
        plan.append(Planned(f"{SHARE}/mosquitto/{name}", data_bytes(f"config/mosquitto/{name}")))
    return plan


def shipped_broker_files() -> list[str]:
    node = resources.files("agent").joinpath("data", "config", "mosquitto")
    return sorted(entry.name for entry in node.iterdir() if entry.is_file())


# --- The CA and the site bundles (hq/pki.py makes the certificates) -------------

def pki_dir_for(hq_config: str) -> str:
    """The CA lives beside the HQ config: ``/etc/edge-agent-hq/pki``."""
    return os.path.join(os.path.dirname(os.path.abspath(hq_config)), "pki")


# --- Writing a plan -------------------------------------------------------------------

def _group_ids(root: str) -> dict[str, int]:
    """Groups in ROOT/etc/group (what systemd-sysusers writes), name -> gid."""
    found: dict[str, int] = {}
    try:
        text = Path(under(root, "/etc/group")).read_text(encoding="utf-8")
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[2].isdigit():
            found[parts[0]] = int(parts[2])
    return found


@dataclass
class Outcome:
    """What writing a plan did (or, in a dry run, would do)."""

    lines: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)


def write_plan(plan: Iterable[Planned], root: str, *, dry_run: bool,
               staging: str | None = None, force: bool = False) -> Outcome:
    """Write ``plan`` under ``root`` (into ``staging`` instead when ``dry_run``).

    Kept files that exist are left alone. Secrets get their mode before a byte
    is written (created 0600, then chmod), so nothing is readable in between.
    Group ownership needs root and the group (systemd-sysusers); without them
    the step is listed under ``next_steps``.
    """
    outcome = Outcome()
    groups = _group_ids(root)
    may_chown = hasattr(os, "geteuid") and os.geteuid() == 0
    width = 0
    items = list(plan)
    for item in items:
        width = max(width, len(item.path))
    for item in items:
        target = under(root, item.path)
        exists = os.path.exists(target)
        owner = f"root:{item.group}" if item.group else "root"
        if exists and item.keep and not force:
            outcome.lines.append(f"  keep   {item.path:<{width}}  (exists; not overwritten)")
            continue
        verb = "update" if exists else "write"
        outcome.lines.append(f"  {verb:<6} {item.path:<{width}}  {item.mode:04o} {owner}")
        dest = under(staging, item.path) if dry_run and staging else target
        if dry_run and not staging:
            continue
        _write(dest, item.data, item.mode)
        outcome.written.append(item.path)
        if item.group and not dry_run:
            gid = groups.get(item.group)
            if may_chown and gid is not None:
                os.chown(dest, 0, gid)
            else:
                outcome.next_steps.append(f"chgrp {item.group} {target}")
    return outcome


def _write(dest: str, data: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    tmp = f"{dest}.tmp-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def resolver(root: str, staging: str | None = None, staged: Iterable[str] = ()) -> Resolve:
    """Map a path as on the box to where it is on this machine now: under ``staging`` for
    what a dry run staged, else under ``root``."""
    staged_set = set(staged)

    def resolve(path: str) -> str:
        if not path or not os.path.isabs(path):
            return path
        if staging and path in staged_set:
            return under(staging, path)
        return under(root, path)
    return resolve


# Keys holding paths on the box, read by check-config: rewritten by ``rooted``.
_PATH_KEYS = {
    "mqtt": ("ca_file", "cert_file", "key_file", "password_file", "hq_key_file"),
    "api": ("tokens_file",),
    "outbox": ("path",),
    "hq": ("master_key_file", "tokens_file"),
}


def rooted(resolve: Resolve) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A transform of a config file's TOML data: its path keys resolved by ``resolve``."""
    def transform(data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for section, keys in _PATH_KEYS.items():
            table = out.get(section)
            if isinstance(table, dict):
                table = dict(table)
                for key in keys:
                    if isinstance(table.get(key), str) and table[key]:
                        table[key] = resolve(table[key])
                store = table.get("store")
                if section == "hq" and isinstance(store, str) and \
                        store.startswith("sqlite:///"):
                    table["store"] = "sqlite:///" + resolve("/" + store.removeprefix(
                        "sqlite:///").lstrip("/")).lstrip("/")
                out[section] = table
        return out
    return transform


def run_install(plan: list[Planned], *, root: str, dry_run: bool, config: str,
                check: Callable[[str, Resolve], str], title: str,
                after: list[str], force: bool = False) -> int:
    """Write (or stage) ``plan``, then check ``config``; print what happened. 0 or 2."""
    where = root or "/"
    print(f"{title} (root {where}{', dry run: nothing written' if dry_run else ''})")
    staging = tempfile.mkdtemp(prefix="edge-agent-install-") if dry_run else None
    try:
        outcome = write_plan(plan, root, dry_run=dry_run, staging=staging, force=force)
        if not dry_run:
            _create_users(root, outcome)
        for line in outcome.lines:
            print(line)
        resolve = resolver(root, staging, outcome.written)
        try:
            summary = check(resolve(config), resolve)
        except ConfigError as exc:
            print(f"check-config {config}: not valid yet:")
            for issue in exc.issues:
                print(f"  {issue}")
            _print_steps(outcome.next_steps + after)
            return 2
        print(f"check-config {config}: {summary}")
        _print_steps(outcome.next_steps + after)
        return 0
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _print_steps(steps: list[str]) -> None:
    if steps:
        print("next:")
        for step in steps:
            print(f"  {step}")


def _create_users(root: str, outcome: Outcome) -> None:
    """As root, create the service users now (``systemd-sysusers``, under ``--root`` too), so
    the secrets get their group at once: what a package's postinst does."""
    conf = "/etc/sysusers.d/edge-agent.conf"
    tool = shutil.which("systemd-sysusers")
    if os.geteuid() != 0 or tool is None or not os.path.exists(under(root, conf)):
        return
    argv = [tool, *([f"--root={root}"] if root and root != "/" else []), under(root, conf)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        outcome.lines.append(f"  users  systemd-sysusers failed: {done.stderr.strip()[:200]}")
        return
    outcome.lines.append(f"  users  {SITE_GROUP}, {HQ_GROUP} (systemd-sysusers {conf})")
    groups = _group_ids(root)
    remaining = []
    for step in outcome.next_steps:
        _, group, path = step.split(" ", 2)
        if step.startswith("chgrp ") and group in groups:
            os.chown(path, 0, groups[group])
        else:
            remaining.append(step)
    outcome.next_steps[:] = remaining
