"""The v1 envelope: ids, timestamps, bytes."""

from __future__ import annotations

import json

import pytest

from agent.envelope import UUIDv7, decode, encode, iso_ms, parse_iso


def test_uuidv7_is_time_ordered_and_unique() -> None:
    """Ids issued in sequence sort in issue order, carry version 7, and never repeat."""
    gen = UUIDv7()
    ids = [gen.new(now_ms=1_795_000_000_000 + i // 50) for i in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i[14] == "7" and i[19] in "89ab" for i in ids)


def test_uuidv7_monotonic_when_the_clock_steps_back() -> None:
    """A wall clock that steps backwards still yields increasing ids."""
    gen = UUIDv7()
    first = gen.new(now_ms=2_000_000)
    assert gen.new(now_ms=1_000_000) > first


def test_iso_ms_roundtrip() -> None:
    """Timestamps are UTC with milliseconds and a Z, and parse back."""
    ts = iso_ms(1795367991.482)
    assert ts.endswith("Z") and len(ts) == 24
    assert parse_iso(ts) == pytest.approx(1795367991.482, abs=1e-3)


def test_encode_decode_roundtrip() -> None:
    """encode splices pre-serialised data; decode validates the header fields."""
    raw = encode(event_id="x", site="s", kind="sale", seq=3, ts="2026-11-22T17:03:11.482Z",
                 source="pos-2", data_json='{"a":1}', extra={"seq_end": 9})
    env = decode(raw)
    assert env["data"] == {"a": 1} and env["seq"] == 3 and env["seq_end"] == 9
    assert json.loads(raw)["v"] == 1


@pytest.mark.parametrize("payload", [b"\xff", b"[]", b'{"v":1}', b'{"v":2,"id":"a","site":"s",'
                                     b'"kind":"sale","seq":1,"ts":"t"}',
                                     b'{"v":1,"id":"a","site":"s","kind":"sale","seq":0,"ts":"t"}',
                                     b'{"v":1,"id":"a","site":"s","kind":"sale","seq":true,'
                                     b'"ts":"t"}'])
def test_decode_rejects_bad_envelopes(payload: bytes) -> None:
    """Garbage, wrong versions and bad seqs raise ValueError, never anything else."""
    with pytest.raises(ValueError):
        decode(payload)
