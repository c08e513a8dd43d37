"""The simulated printers (sim:// and the TCP fakes) behave like the real ones on the wire."""

from __future__ import annotations

from drivers.printer.sim import SimEscposPrinter, SimZplPrinter
from drivers.printer.status import (
    ESCPOS_CLEAR_BUFFERS,
    ESCPOS_CLEAR_REPLY,
    ZPL_CANCEL_ALL,
    parse_host_status,
)

RECEIPT = b"\x1b@hello\n\x10\x04\x04more\n\x1bd\x06\x1dV\x00"


def test_escpos_stream_cut_into_single_bytes_is_one_document() -> None:
    """Fed one byte at a time, a receipt is still one document and its DLE EOT is answered."""
    sim = SimEscposPrinter()
    replies = b"".join(sim.feed(RECEIPT[i:i + 1]) for i in range(len(RECEIPT)))
    assert replies == b"\x12"  # the DLE EOT 4 inside, answered "paper adequate"
    assert sim.printed == [b"\x1b@hello\nmore\n\x1bd\x06\x1dV\x00"]  # the query is not printed


def test_escpos_data_waits_while_faulted_and_prints_on_recovery() -> None:
    """Like a real printer: a receipt sent with the cover open comes out when it is closed."""
    sim = SimEscposPrinter("head_open")
    sim.feed(b"one\x1dV\x00")
    assert sim.printed == [] and sim.waiting == [b"one\x1dV\x00"]
    sim.set_state("ok")
    assert sim.printed == [b"one\x1dV\x00"]


def test_escpos_clear_buffers_drops_what_waits() -> None:
    """DLE DC4 8 drops waiting data (nothing prints on recovery) and answers 37 25 00."""
    sim = SimEscposPrinter("paper_out")
    sim.feed(b"one\x1dV\x00two-unfinished")
    assert sim.feed(ESCPOS_CLEAR_BUFFERS) == ESCPOS_CLEAR_REPLY
    sim.set_state("ok")
    sim.feed(b"three\x1dV\x00")
    assert sim.printed == [b"three\x1dV\x00"]


def test_zpl_formats_and_split_status_queries() -> None:
    """Formats print in order; a ~HS cut across two reads is still answered once."""
    sim = SimZplPrinter()
    assert sim.feed(b"^XA^FDa^FS^XZ^XA^FDb") == b""
    assert sim.feed(b"^FS^XZ~H") == b""
    reply = sim.feed(b"S")
    assert parse_host_status(reply).state.value == "online"
    assert sim.printed == [b"^XA^FDa^FS^XZ", b"^XA^FDb^FS^XZ"] and sim.queries == 1


def test_zpl_status_counts_a_format_sent_just_before_it() -> None:
    """Stream order: a label then ~HS in one read is already in the buffer when ~HS is answered."""
    sim = SimZplPrinter("paused")
    status = parse_host_status(sim.feed(b"^XA^FDa^FS^XZ~HS"))
    assert status.state.value == "paused" and status.formats_queued == 1


def test_zpl_is_silent_when_out_of_media_and_cancel_all_drops_formats() -> None:
    """Out of media: no ~HS answer; ~JA drops waiting and half-sent formats."""
    sim = SimZplPrinter("paper_out")
    assert sim.feed(b"^XA^FDa^FS^XZ~HS") == b""
    sim.feed(b"^XA^FDhalf")
    sim.feed(ZPL_CANCEL_ALL)
    sim.feed(b"^FS^XZ")  # the end of the dropped format is not a format
    sim.set_state("ok")
    assert sim.printed == [] and sim.cleared == 1


def test_fault_after_next_document_keeps_that_document_waiting() -> None:
    """The test hook: the next document trips the fault and stays unprinted."""
    sim = SimZplPrinter()
    sim.fault_after_next_document("paper_out")
    sim.feed(b"^XA^FDa^FS^XZ")
    assert sim.state == "paper_out" and sim.waiting == [b"^XA^FDa^FS^XZ"] and sim.printed == []
