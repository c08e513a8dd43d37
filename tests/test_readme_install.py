"""README's install section, run line by line from README.md, so it cannot rot.

The test builds the wheel (`pip wheel --no-deps`), then runs the README's HQ
block and box block, each in its own temporary root standing in for that
machine: a fresh venv per machine with the wheel installed into it, and
`EDGE_AGENT_ROOT` so every `edge-agent` command works under the root. Only
what needs the machine itself is rewritten, each by an explicit rule below:
absolute install paths go under the root, `systemctl enable --now` becomes the
offline `systemctl --root`, udev's reload becomes a check that the rules file
is there, and `edge-agent status` (no daemon runs in a temp root) is left out.
Any other line runs verbatim, and must succeed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def block(name: str) -> list[str]:
    """The command lines of the ```sh block after ``<!-- install-test: NAME -->``."""
    text = README.read_text()
    match = re.search(rf"<!-- install-test: {name} -->\n```sh\n(.*?)```", text, re.S)
    assert match, f"README.md has no install-test block {name!r}"
    lines = [line.strip() for line in match.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def for_root(line: str) -> str | None:
    """``line`` as it runs under ``$ROOT``; None for the one line left out."""
    if line == "edge-agent status":
        return None   # asks a running daemon; none runs in a temp root
    if line == "udevadm control --reload && udevadm trigger":
        return 'test -f "$ROOT/etc/udev/rules.d/99-edge-agent.rules"'
    enable = re.fullmatch(r"systemctl daemon-reload && systemctl enable --now (\S+)", line)
    if enable:
        return f'systemctl --root "$ROOT" enable {shlex.quote(enable.group(1))}'
    return line.replace("/opt/edge-agent", "$ROOT/opt/edge-agent") \
               .replace("/usr/local/bin", "$ROOT/usr/local/bin")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(out), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("edge_agent-*.whl")
    return found


def run_block(name: str, machine: Path, wheel: Path) -> str:
    """Run README block ``name`` on a fresh "machine" (its root and working directory)."""
    root, cwd = machine / "root", machine / "home"
    root.mkdir(parents=True)
    cwd.mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, cwd)
    script = ["set -eu"]
    for line in block(name):
        rewritten = for_root(line)
        if rewritten is not None:
            script += [f"echo '+ {line}'", rewritten]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EDGE_AGENT", "VIRTUAL_ENV", "PYTHON"))}
    env.update(ROOT=str(root), EDGE_AGENT_ROOT=str(root),
               PATH=f"{root}/usr/local/bin:{os.environ['PATH']}")
    (root / "usr/local/bin").mkdir(parents=True)
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block {name} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_readme_install_blocks_run_in_temp_roots(tmp_path: Path, wheel: Path) -> None:
    """HQ's block then the box's, verbatim but for the rooted rewrites: the wheel installs
    into a fresh venv, HQ issues the site's bundle, the box's dry run and install both end
    on a valid check-config, and the units are enabled offline."""
    hq_out = run_block("hq", tmp_path / "hq", wheel)
    assert "check-config /etc/edge-agent-hq/hq.toml: valid" in hq_out
    # "Copy the bundle to the box" (scp -r co-denver-01 box:).
    shutil.copytree(tmp_path / "hq/home/co-denver-01", tmp_path / "box/home/co-denver-01")
    box_out = run_block("box", tmp_path / "box", wheel)
    dry, real = box_out.split("+ edge-agent install --bundle")
    assert "dry run: nothing written" in dry
    assert "check-config /etc/edge-agent/agent.toml: valid (site co-denver-01" in dry
    assert "check-config /etc/edge-agent/agent.toml: valid (site co-denver-01" in real
    box = tmp_path / "box/root"
    venv_script = box / "opt/edge-agent/bin/edge-agent"
    assert venv_script.is_file()
    unit = (box / "etc/systemd/system/edge-agent.service").read_text()
    assert "ExecStart=/opt/edge-agent/bin/edge-agent run" in unit   # the box's path
    assert (box / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()
    assert (tmp_path / "hq/root/etc/systemd/system/multi-user.target.wants/"
            "edge-agent-hq.service").is_symlink()


def test_every_readme_line_is_run_or_explicitly_left_out() -> None:
    """Only `edge-agent status` is left out; every other line runs (maybe rooted)."""
    lines = block("hq") + block("box")
    assert [line for line in lines if for_root(line) is None] == ["edge-agent status"]
    assert any(line.startswith("edge-agent install --dry-run") for line in lines)
