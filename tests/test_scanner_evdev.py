"""Keyboard-wedge scanners through evdev: input events to text, captures through the transport."""

from __future__ import annotations

import threading
from pathlib import Path

import evdev.ecodes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.scanner.errors import DeviceUnavailable
from drivers.scanner.evdev_keys import (
    EV_KEY,
    EV_SYN,
    KEY_CODES,
    EvdevKeyDecoder,
    encode_key_events,
    unpack_events,
)
from drivers.scanner.parse import Scan
from drivers.scanner.reader import ScannerReader
from drivers.scanner.replay import ReplayEventSource
from drivers.scanner.transport import EvdevTransport, PyEvdevSource
from tests.conftest import wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "scanner"
TAG = "1A4FF0100000022000000123"
GS1 = "]d2" + "0109501101530003" + "17260430" + "10LOT42A\x1d" + "21SN123"
RETAIL = "]Q1HTTPS://1A4.COM/5LN8CBN1UB33DON9CHKX"
K = KEY_CODES


def test_key_codes_match_the_kernel_abi() -> None:
    """Every hard-coded key code equals python-evdev's KEY_* constant."""
    for name, code in KEY_CODES.items():
        assert evdev.ecodes.ecodes[f"KEY_{name}"] == code, name


def test_events_to_text_with_shift_and_enter() -> None:
    """Press/release pairs with Shift held type upper case; KEY_ENTER types CR."""
    events = [(EV_KEY, K["A"], 1), (EV_KEY, K["A"], 0),
              (EV_KEY, K["LEFTSHIFT"], 1), (EV_KEY, K["A"], 1), (EV_KEY, K["A"], 0),
              (EV_KEY, K["1"], 1), (EV_KEY, K["1"], 0), (EV_KEY, K["LEFTSHIFT"], 0),
              (EV_SYN, 0, 0), (EV_KEY, K["ENTER"], 1), (EV_KEY, K["ENTER"], 0)]
    assert EvdevKeyDecoder().feed_many(events) == "aA!\r"


def test_autorepeat_and_releases_type_nothing() -> None:
    """value 2 (autorepeat) and value 0 (release) do not type."""
    dec = EvdevKeyDecoder()
    assert dec.feed_many([(EV_KEY, K["B"], 1), (EV_KEY, K["B"], 2), (EV_KEY, K["B"], 2),
                          (EV_KEY, K["B"], 0)]) == "b"


def test_ctrl_bracket_and_alt_code_give_group_separator() -> None:
    """Ctrl+] and Alt+KP0,KP0,KP2,KP9 both type GS (0x1D)."""
    dec = EvdevKeyDecoder()
    ctrl = [(EV_KEY, K["RIGHTCTRL"], 1), (EV_KEY, K["RIGHTBRACE"], 1),
            (EV_KEY, K["RIGHTBRACE"], 0), (EV_KEY, K["RIGHTCTRL"], 0)]
    alt = [(EV_KEY, K["LEFTALT"], 1)]
    for d in "0029":
        alt += [(EV_KEY, K[f"KP{d}"], 1), (EV_KEY, K[f"KP{d}"], 0)]
    alt.append((EV_KEY, K["LEFTALT"], 0))
    assert dec.feed_many(ctrl + alt) == "\x1d\x1d"


def test_caps_lock_inverts_letters_only() -> None:
    """After CapsLock, letters invert case; digits and symbols do not."""
    dec = EvdevKeyDecoder()
    events = [(EV_KEY, K["CAPSLOCK"], 1), (EV_KEY, K["CAPSLOCK"], 0),
              (EV_KEY, K["A"], 1), (EV_KEY, K["A"], 0), (EV_KEY, K["1"], 1), (EV_KEY, K["1"], 0)]
    assert dec.feed_many(events) == "A1"


@pytest.mark.parametrize(("fixture", "expected"), [
    ("evdev_package_tag.evdev", TAG + "\r"),
    ("evdev_gs1_datamatrix.evdev", GS1 + "\r"),
    ("evdev_retail_id.evdev", RETAIL + "\r"),
])
def test_recorded_event_captures_decode(fixture: str, expected: str) -> None:
    """Raw input_event captures (MSC_SCAN/EV_KEY/SYN, one autorepeat) decode exactly."""
    events = unpack_events((FIXTURES / fixture).read_bytes())
    assert events[0][0] >= 1_700_000_000  # real timestamps survive unpacking
    assert EvdevKeyDecoder().feed_many((t, c, v) for _, t, c, v in events) == expected


def test_torn_event_tail_is_dropped() -> None:
    """A capture cut mid-record decodes the whole records and ignores the rest."""
    raw = encode_key_events("ab")
    events = unpack_events(raw[:-5])
    assert EvdevKeyDecoder().feed_many((t, c, v) for _, t, c, v in events) == "ab"


def test_evdev_path_that_does_not_exist_is_unavailable() -> None:
    """python-evdev's failure to open a missing node maps to DeviceUnavailable."""
    with pytest.raises(DeviceUnavailable) as err:
        PyEvdevSource("/dev/input/by-id/usb-nothing-event-kbd")
    assert "/dev/input/by-id/usb-nothing-event-kbd" in str(err.value)


def test_event_captures_through_reader_then_unplug() -> None:
    """Captures fed at the evdev boundary become scans; an unplug turns the state down once."""
    source = ReplayEventSource()
    for name in ("evdev_package_tag.evdev", "evdev_gs1_datamatrix.evdev",
                 "evdev_retail_id.evdev"):
        source.push_raw((FIXTURES / name).read_bytes())
    source.vanish()
    scans: list[Scan] = []
    states: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    def on_state(state: str, reason: str | None) -> None:
        with lock:
            states.append((state, reason))

    def factory() -> ReplayEventSource:
        if source.closed:  # unplugged for good in this test
            raise DeviceUnavailable("/dev/input/by-id/test-kbd", "No such file or directory")
        return source

    transport = EvdevTransport(factory, where="/dev/input/by-id/test-kbd")
    reader = ScannerReader("till-2", "evdev:///dev/input/by-id/test-kbd", {}, scans.append,
                           on_state, transport=transport)
    with reader:
        wait_for(lambda: len(scans) == 3 and reader.state == "down", 5, what="scans then down")
        wait_for(lambda: reader.snapshot()["state"] == "down", 1)
    assert [s.classification for s in scans] == ["package_tag", "gtin", "retail_id"]
    assert [s for s, _ in states] == ["up", "down"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x1F), st.integers(0, 0x2FF), st.integers(-1, 3)),
                max_size=200))
def test_random_events_never_raise(events: list[tuple[int, int, int]]) -> None:
    """Arbitrary (type, code, value) events decode to text without an exception."""
    assert isinstance(EvdevKeyDecoder().feed_many(events), str)
