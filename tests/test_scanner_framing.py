"""Byte stream to reads: terminators, idle timeout, affixes, limits, debounce, options."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.scanner import framing
from drivers.scanner.errors import BadScannerConfig
from drivers.scanner.framing import Debouncer, Frame, Framer
from drivers.scanner.options import ScannerOptions
from drivers.scanner.parse import Scan, parse_scan
from drivers.scanner.transport import scanner_setup


def frames(framer: Framer, *chunks: bytes, now: float = 0.0) -> list[Frame]:
    out: list[Frame] = []
    for chunk in chunks:
        out += framer.feed(chunk, now)
    return out


def datas(fs: list[Frame]) -> list[bytes]:
    return [f.data for f in fs]


@pytest.mark.parametrize(("terminator", "stream", "expected"), [
    ("cr", b"AB\rCD\r", [b"AB", b"CD"]),
    ("lf", b"AB\nCD\n", [b"AB", b"CD"]),
    ("crlf", b"AB\r\nCD\r\n", [b"AB", b"CD"]),
    ("crlf", b"A\rB\r\n", [b"A\rB"]),
    ("tab", b"AB\tCD\t", [b"AB", b"CD"]),
    ("any", b"AB\r\nCD\rEF\n\n\r", [b"AB", b"CD", b"EF"]),
])
def test_terminators(terminator: str, stream: bytes, expected: list[bytes]) -> None:
    """Each terminator setting cuts reads where it should; empty lines are dropped."""
    framer = Framer(ScannerOptions(terminator=terminator))
    assert datas(frames(framer, stream)) == expected


def test_reads_split_across_chunks_byte_by_byte() -> None:
    """A read arriving one byte at a time (a slow UART) is one read."""
    framer = Framer(ScannerOptions(terminator="crlf"))
    out = frames(framer, *[bytes([b]) for b in b"1A4FF\r\nXY\r\n"])
    assert datas(out) == [b"1A4FF", b"XY"]


def test_crlf_split_between_chunks_under_any() -> None:
    """CR in one chunk and LF in the next still make exactly one read."""
    framer = Framer(ScannerOptions(terminator="any"))
    assert datas(frames(framer, b"AB\r", b"\nCD\r", b"\n")) == [b"AB", b"CD"]


def test_idle_timeout_completes_a_read() -> None:
    """With terminator none, silence of idle_timeout_ms ends a read (time injected)."""
    framer = Framer(ScannerOptions(terminator="none", idle_timeout_ms=80))
    assert framer.feed(b"ABC", 10.0) == []
    assert framer.feed(b"DEF", 10.05) == []
    assert framer.deadline() == pytest.approx(10.13)
    assert framer.poll(10.12) == []
    assert datas(framer.poll(10.13)) == [b"ABCDEF"]
    assert framer.deadline() is None


def test_idle_timeout_also_applies_with_a_terminator() -> None:
    """idle_timeout_ms with a terminator: either ends a read, both valid."""
    framer = Framer(ScannerOptions(terminator="cr", idle_timeout_ms=50))
    assert datas(framer.feed(b"AB\rCD", 1.0)) == [b"AB"]
    out = framer.poll(1.05)
    assert datas(out) == [b"CD"] and out[0].problem is None


def test_missing_terminator_becomes_partial_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bytes that stop without the expected terminator come out flagged partial."""
    monkeypatch.setattr(framing, "PARTIAL_TIMEOUT_S", 0.5)
    framer = Framer(ScannerOptions(terminator="cr"))
    framer.feed(b"1A4FF01", 3.0)
    assert framer.poll(3.4) == []
    out = framer.poll(3.5)
    assert len(out) == 1 and out[0].data == b"1A4FF01"
    assert out[0].problem is not None and out[0].problem.startswith("partial read")


def test_silence_before_new_bytes_ends_the_previous_read() -> None:
    """feed() polls first, so a read idle-completed before new bytes arrive stays separate."""
    framer = Framer(ScannerOptions(terminator="none", idle_timeout_ms=50))
    framer.feed(b"AAA", 0.0)
    assert datas(framer.feed(b"BBB", 1.0)) == [b"AAA"]
    assert datas(framer.poll(1.05)) == [b"BBB"]


def test_prefix_and_suffix_are_stripped_when_present() -> None:
    """Configured affixes are removed; a read without them is kept whole."""
    framer = Framer(ScannerOptions(prefix=b"\x02", suffix=b"\x03"))
    assert datas(frames(framer, b"\x02ABC\x03\r\nDEF\r\n")) == [b"ABC", b"DEF"]


def test_over_long_read_is_cut_reported_and_skipped_to_terminator() -> None:
    """More than max_length bytes without a terminator: one invalid frame, then resync."""
    framer = Framer(ScannerOptions(max_length=16))
    out = frames(framer, b"X" * 10, b"X" * 10, b"Y" * 30, b"Z\rGOOD\r")
    assert [f.problem is not None for f in out] == [True, False]
    assert out[0].data == b"X" * 16 and "over-long" in (out[0].problem or "")
    assert out[1].data == b"GOOD"


def test_flush_turns_buffered_bytes_into_a_partial_read() -> None:
    """A vanishing device mid-read yields the buffered bytes with the given problem."""
    framer = Framer()
    framer.feed(b"1A4", 0.0)
    out = framer.flush("partial read: device vanished mid-read")
    assert out == [Frame(b"1A4", b"1A4", "partial read: device vanished mid-read")]
    assert framer.flush("x") == []


def test_whole_reads_strip_affixes_and_stray_terminator() -> None:
    """HID-POS reads arrive whole; a trailing CR and affixes are still removed."""
    framer = Framer(ScannerOptions(prefix=b"#"))
    assert datas(framer.whole(b"#ABC\r")) == [b"ABC"]


def test_debounce_counts_repeats_within_window_once() -> None:
    """Same code within the window counts once; after the window it counts again."""
    deb = Debouncer(0.5)
    assert deb.accept("A", 0.0)
    assert not deb.accept("A", 0.2)
    assert deb.accept("B", 0.3)
    assert not deb.accept("A", 0.49)
    assert deb.accept("A", 0.5)
    assert Debouncer(0).accept("A", 0.0) and Debouncer(0).accept("A", 0.0)


def test_options_from_entry_and_url_query() -> None:
    """URL query options merge with entry keys (entry wins); the URL keeps the rest."""
    url, opts = scanner_setup("socket://127.0.0.1:9?baudrate=19200&logging=debug",
                              {"terminator": "CRLF", "debounce_ms": 0, "prefix": "]",
                               "id": "c1", "type": "scanner"})
    assert url == "socket://127.0.0.1:9?logging=debug"
    assert opts == ScannerOptions(terminator="crlf", debounce_ms=0, prefix=b"]", baudrate=19200)
    _, opts = scanner_setup("serial:///dev/ttyACM0?baudrate=9600", {"baudrate": 115200})
    assert opts.baudrate == 115200


@pytest.mark.parametrize(("entry", "key", "text"), [
    ({"terminator": "semicolon"}, "devices[c1].terminator", "must be one of"),
    ({"debounce": 100}, "devices[c1].debounce", "unknown scanner option"),
    ({"baudrate": "fast"}, "devices[c1].baudrate", "whole number"),
    ({"idle_timeout_ms": 0}, "devices[c1].idle_timeout_ms", "must be 1..60000"),
    ({"hid_mode": "mouse"}, "devices[c1].hid_mode", "must be one of"),
    ({"grab": "maybe"}, "devices[c1].grab", "true or false"),
])
def test_bad_options_name_the_key(entry: dict[str, object], key: str, text: str) -> None:
    """Each bad option raises BadScannerConfig naming the device and key."""
    with pytest.raises(BadScannerConfig) as err:
        scanner_setup("serial:///dev/ttyACM0", entry, where="devices[c1]")
    assert err.value.key == key and text in str(err.value)


terminators = st.sampled_from(["cr", "lf", "crlf", "tab", "any", "none"])


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=20),
       terminator=terminators, idle=st.one_of(st.none(), st.integers(1, 100)),
       max_length=st.integers(16, 300), prefix=st.binary(max_size=3))
def test_random_bytes_never_raise_through_framing_and_parsing(
        stream: bytes, cuts: list[int], terminator: str, idle: int | None, max_length: int,
        prefix: bytes) -> None:
    """Any byte stream, cut anywhere, under any options: frames parse to Scans, no exception."""
    framer = Framer(ScannerOptions(terminator=terminator, idle_timeout_ms=idle,
                                   max_length=max_length, prefix=prefix))
    now, pos, out = 0.0, 0, []
    for cut in [*sorted(cuts), len(stream)]:
        out += framer.feed(stream[pos:cut], now)
        pos = max(pos, cut)
        now += 0.01
    out += framer.poll(now + 10) + framer.flush("partial read: test")
    for frame in out:
        assert len(frame.data) <= max_length
        scan = parse_scan(frame.data, raw=frame.raw, problem=frame.problem)
        assert isinstance(scan, Scan)
        assert scan.valid == (scan.reason is None)
        if scan.valid:
            assert all(ch.isprintable() or ch in "\x1d\x1e\x04" for ch in scan.code)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000))
def test_random_bytes_never_raise_in_parse(data: bytes) -> None:
    """parse_scan on arbitrary bytes returns a Scan, never raises."""
    scan = parse_scan(data)
    assert isinstance(scan, Scan) and scan.valid == (scan.reason is None)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200).map(lambda s: "]d2" + s))
def test_random_gs1_looking_text_never_raises(text: str) -> None:
    """Arbitrary text after a GS1 AIM goes through biip without an exception escaping."""
    assert isinstance(parse_scan(text.encode()), Scan)
