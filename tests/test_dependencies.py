"""Every third-party module agent/, hq/ and drivers/ import is declared, with a range."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Our own top-level packages (the site daemon, HQ, the drivers): not dependencies.
OURS = ("agent", "hq", "drivers")


def declared() -> dict[str, str]:
    """Distribution name (normalised) -> its requirement string, from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = {}
    extras = [r for reqs in project.get("optional-dependencies", {}).values() for r in reqs]
    for req in [*project["dependencies"], *extras]:
        name = re.match(r"[A-Za-z0-9_.-]+", req)
        assert name, req
        out[re.sub(r"[-_.]+", "-", name.group(0)).lower()] = req
    return out


def imported() -> set[str]:
    names: set[str] = set()
    for path in [p for top in OURS for p in ROOT.glob(f"{top}/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in OURS}


def test_every_import_is_declared_with_an_upper_bound() -> None:
    """A module imported by the package belongs to a distribution listed in [project]
    dependencies (or an extra, for a lazy import), and each range has an upper bound."""
    deps = declared()
    dists = packages_distributions()
    missing = []
    for module in sorted(imported()):
        owners = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not owners & deps.keys():
            missing.append(f"{module} (from {sorted(owners)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    unbounded = [req for req in deps.values() if "<" not in req.split(";")[0]]
    assert not unbounded, unbounded
