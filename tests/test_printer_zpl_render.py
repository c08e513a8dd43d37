"""Our ZPL, rendered by a ZPL renderer no one here wrote, decoded by zxing-cpp to tag and URL.

The renderer is zpl-renderer-js (npm, MIT), a WebAssembly build of IngridHQ's
Zebrash (Go), with the wasm inlined in the package: it renders offline, and as
root the test runs it with no network at all (``unshare --net``). It is
installed outside the repo by ``npm install --prefix .venv/zpl-renderer
zpl-renderer-js@3.4.0`` (or point ``ZPL_RENDERER_DIR`` at a folder holding
``node_modules/zpl-renderer-js``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from drivers.printer import LabelOptions, render_label
from tests.printer_fakes import LABEL, LABEL_OPTIONS, RETAIL_ID_URL, TAG

REPO = Path(__file__).resolve().parent.parent
RENDERER_DIR = Path(os.environ.get("ZPL_RENDERER_DIR", REPO / ".venv" / "zpl-renderer"))
INSTALL = "npm install --prefix .venv/zpl-renderer --no-save zpl-renderer-js@3.4.0"

# Reads [[name, zpl, width_mm, height_mm, dots_per_mm], ...] on stdin, writes name.png each.
RENDER_JS = """
const { ready } = require("zpl-renderer-js");
const fs = require("fs");
const path = require("path");
(async () => {
  const { api } = await ready;
  const jobs = JSON.parse(fs.readFileSync(0, "utf8"));
  for (const [name, zpl, w, h, dpmm] of jobs) {
    const png = await api.zplToBase64Async(zpl, w, h, dpmm);
    fs.writeFileSync(path.join(process.argv[2], name + ".png"), Buffer.from(png, "base64"));
  }
  process.exit(0);
})().catch((e) => { console.error(String(e)); process.exit(1); });
"""

# name -> (label changes, options changes, width mm, height mm, Zebra dots per mm)
CASES: dict[str, tuple[dict[str, object], dict[str, object], float, float, int]] = {
    "4x3in-203dpi": ({}, {}, 101.6, 76.2, 8),
    "4x3in-300dpi": ({}, {"dpi": 300}, 101.6, 76.2, 12),
    "4x3in-600dpi": ({}, {"dpi": 600}, 101.6, 76.2, 24),
    "100x150mm-300dpi": ({}, {"width": 100, "height": 150, "size_unit": "mm", "dpi": 300},
                         100, 150, 12),
    "2x2in-203dpi-unicode": ({"product": "Crème ^Brûlée~ Kush_1", "strain": None},
                             {"width": 2.5, "height": 2.5, "warning": "Keep away from kids."},
                             63.5, 63.5, 8),
    "no-retail-id": ({"retail_id_url": None}, {}, 101.6, 76.2, 8),
}


def _renderer() -> list[str]:
    node = shutil.which("node")
    module = RENDERER_DIR / "node_modules" / "zpl-renderer-js"
    if node is None or not module.is_dir():
        pytest.fail(f"the independent ZPL renderer is not installed (node: {node}, {module}); "
                    f"run: {INSTALL}  (Debian: apt-get install nodejs npm)")
    # As root, prove it renders offline: no network namespace, no network.
    if os.geteuid() == 0 and shutil.which("unshare"):
        return ["unshare", "--net", node]
    return [node]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Image.Image]:
    """Every case's ZPL rendered to PNG by zpl-renderer-js, in one node process."""
    out = tmp_path_factory.mktemp("zpl-render")
    script = out / "render.cjs"
    script.write_text(RENDER_JS)
    jobs = []
    for name, (label_change, opts_change, w, h, dpmm) in CASES.items():
        label = {k: v for k, v in {**LABEL, **label_change}.items() if v is not None}
        options = LabelOptions(**{**LABEL_OPTIONS, **opts_change})
        jobs.append([name, render_label(label, options).decode("ascii"), w, h, dpmm])
    env = {**os.environ, "NODE_PATH": str(RENDERER_DIR / "node_modules")}
    proc = subprocess.run([*_renderer(), str(script), str(out)], input=json.dumps(jobs),
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, f"zpl-renderer-js failed: {proc.stderr[-2000:]}"
    return {name: Image.open(io.BytesIO((out / f"{name}.png").read_bytes())) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_independent_renderer_decodes_tag_and_url(rendered: dict[str, Image.Image],
                                                  name: str) -> None:
    """zpl-renderer-js draws our ZPL; zxing-cpp reads the exact package tag and Retail ID URL."""
    found = {r.format.name: r.text for r in zxingcpp.read_barcodes(rendered[name])}
    expected = {"Code128": TAG}
    if CASES[name][0].get("retail_id_url", RETAIL_ID_URL) is not None:
        expected["QRCode"] = RETAIL_ID_URL
    assert found == expected


def test_independent_renderer_uses_the_label_size(rendered: dict[str, Image.Image]) -> None:
    """The rendered labels have the stock's size in dots (width x height at the DPI)."""
    assert rendered["4x3in-203dpi"].size[0] in (812, 813)
    assert rendered["4x3in-300dpi"].size[0] in (1219, 1220)  # Zebra's 300 dpi is 12 dots/mm
    assert rendered["100x150mm-300dpi"].size[1] in (1800, 1801)
