"""Code hygiene the style guide asks for, checked on every run: ruff, mypy strict, flow."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The three top-level packages: the site daemon, HQ beside it, and the hardware drivers.
PACKAGES = ("agent", "hq", "drivers")


def test_ruff_is_clean() -> None:
    """ruff (the rules in pyproject.toml, every ignore commented) finds nothing."""
    result = subprocess.run([str(BIN / "ruff"), "check", *PACKAGES, "tests", "bench"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    """mypy --strict over agent/ and drivers/ reports no error."""
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_drivers_never_import_agent() -> None:
    """One direction of flow: drivers/ is imported by agent/, never the other way round."""
    offenders = []
    for path in (REPO / "drivers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names
                          if n == "agent" or n.startswith("agent.")]
    assert offenders == []


def test_every_broad_except_says_why() -> None:
    """Each ``except Exception`` in agent/, hq/ and drivers/ carries a comment saying why."""
    bare = []
    for top in PACKAGES:
        for path in (REPO / top).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"except Exception\b", line) and "#" not in line:
                    bare.append(f"{path.relative_to(REPO)}:{number}")
    assert bare == []
