"""The simulated scanner: a realistic, reproducible mix through the real reader."""

from __future__ import annotations

from collections import Counter

import pytest

from drivers.scanner.errors import BadScannerConfig
from drivers.scanner.framing import Framer
from drivers.scanner.parse import Scan, parse_scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.sim import SIM_KNOWN_TAGS, SimScanGenerator, SimTransport
from tests.conftest import wait_for


def generated_scans(seed: int, n: int) -> list[Scan]:
    gen = SimScanGenerator(seed)
    framer = Framer()
    scans = []
    for _ in range(n):
        for read in gen.next_reads():
            scans += [parse_scan(f.data, raw=f.raw) for f in framer.feed(read, 0.0)]
    return scans


def test_mix_has_every_kind_a_counter_meets() -> None:
    """Known and unknown tags, a Retail ID, GTINs (EAN and GS1 DataMatrix) and garbled reads."""
    scans = generated_scans(seed=1, n=300)
    kinds = Counter((s.classification, s.valid) for s in scans)
    assert kinds[("package_tag", True)] > 100
    assert kinds[("retail_id", True)] > 10 and kinds[("gtin", True)] > 20
    assert kinds[("other", False)] > 5
    assert set(kinds) == {("package_tag", True), ("retail_id", True), ("gtin", True),
                          ("other", False)}
    tags = [s.code for s in scans if s.classification == "package_tag"]
    assert any(t in SIM_KNOWN_TAGS for t in tags) and any(t not in SIM_KNOWN_TAGS for t in tags)
    rids = [s.retail_id for s in scans if s.retail_id is not None]
    assert all(r["package_tag"] in SIM_KNOWN_TAGS for r in rids)
    assert any(s.symbology == "]d2" and s.gs1 and s.gs1.get("lot") for s in scans)


def test_same_seed_same_sequence() -> None:
    """A seed reproduces the demo's sequence exactly."""
    assert [s.raw for s in generated_scans(7, 50)] == [s.raw for s in generated_scans(7, 50)]
    assert [s.raw for s in generated_scans(7, 50)] != [s.raw for s in generated_scans(8, 50)]


def test_sim_url_through_reader_debounces_double_reads() -> None:
    """sim://scanner through ScannerReader delivers scans; double reads count once."""
    scans: list[Scan] = []
    reader = ScannerReader("demo-counter", "sim://scanner?interval_ms=5&seed=3", {},
                           scans.append, lambda *_: None)
    with reader:
        wait_for(lambda: reader.counts["debounced"] >= 1 and len(scans) >= 20, 10,
                 what="scans and a debounced double read")
    assert reader.counts["scans"] == len(scans)


def test_sim_unplug_cycle() -> None:
    """vanish_every_s makes the simulated scanner go down and come back by itself."""
    states: list[str] = []
    reader = ScannerReader("demo-counter",
                           "sim://scanner?interval_ms=10&seed=1&vanish_every_s=0.2"
                           "&vanish_for_s=0.2", {}, lambda s: None,
                           lambda st, _: states.append(st))
    with reader:
        wait_for(lambda: states[:3] == ["up", "down", "up"], 5, what="an unplug cycle")


def test_sim_transport_parameters() -> None:
    """Parameters are read from the URL; bad ones name the url key."""
    sim = SimTransport.from_url("sim://scanner?interval_ms=250&seed=4&known=AAA,BBB&count=2")
    assert sim.where == "sim://scanner?interval_ms=250&seed=4&known=AAA,BBB&count=2"
    with pytest.raises(BadScannerConfig, match="interval_ms"):
        SimTransport.from_url("sim://scanner?interval_ms=0", where="devices[x]")
    with pytest.raises(BadScannerConfig, match="bad sim parameter"):
        SimTransport.from_url("sim://scanner?seed=abc")
    with pytest.raises(BadScannerConfig, match="sim://scanner"):
        SimTransport.from_url("sim://printer")
