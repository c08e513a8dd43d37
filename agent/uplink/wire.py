"""The paho client the uplink drives, with its socket I/O batched.

paho-mqtt 2.x does one ``send()`` per packet, and, with no thread of its own
and no write callback, does it inside ``publish()``: a pump pass of a few
hundred events was a few hundred syscalls, each a chance for the API's thread
to take the GIL. It reads an incoming packet in three ``recv()`` calls or more
(the command byte, each length byte, the body): each PUBACK and each HQ ack
cost several. :class:`BatchingClient` changes only the I/O under paho's
packet logic:

- writes wait for the uplink's own ``loop_write`` (``on_socket_register_write``
  set, the external-loop contract: "the socket wants writing, the caller writes
  it"), so what a turn publishes, and the PUBACKs a read owes, go out together;
- ``_packet_write`` joins the queued packets that need nothing done once written
  (every packet but a QoS 0 PUBLISH, whose on_publish fires on write, and a
  DISCONNECT, which closes the socket) into one buffer of up to
  :data:`WRITE_CHUNK` bytes, so one ``send()`` carries many packets;
- ``_sock_recv`` reads up to :data:`READ_CHUNK` bytes at once and hands paho
  what it asks for from that buffer; :meth:`BatchingClient.buffered` tells the
  caller bytes are waiting that ``select`` cannot see.

Delivery is unchanged: a QoS 1 PUBLISH still counts only on its PUBACK
(on_publish), which paho matches by mid as before; what a dropped connection
had not written is resent from the outbox by the ledger, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MessageType, MQTTErrorCode

if TYPE_CHECKING:
    from paho.mqtt.client import _OutPacket

WRITE_CHUNK = 64 * 1024   # bytes joined into one send() at most
READ_CHUNK = 64 * 1024    # bytes one recv() asks for

_DISCONNECT = int(MessageType.DISCONNECT)
_PUBLISH = int(MessageType.PUBLISH)


def _plain(packet: _OutPacket) -> bool:
    """Whether paho does nothing with this packet once written (so it can be joined)."""
    command = packet["command"] & 0xF0
    return command != _DISCONNECT and not (command == _PUBLISH and packet["qos"] == 0)


class BatchingClient(mqtt.Client):
    """paho's client with writes left to the owner's loop, joined, and reads buffered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        # The external-loop contract: with this set, publish() only queues; the
        # uplink's turn calls loop_write while want_write() says so.
        self.on_socket_register_write = _no_op

    def buffered(self) -> int:
        """Bytes read from the socket that paho has not taken yet."""
        return len(self._rbuf) - self._rpos

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(READ_CHUNK)   # BlockingIOError when nothing waits
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data                         # (b"" is the peer closing)
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(len(self._rbuf), start + bufsize)
        chunk = self._rbuf[start:self._rpos]
        if self._rpos >= len(self._rbuf):
            self._rbuf, self._rpos = b"", 0
        return chunk

    def _packet_write(self) -> MQTTErrorCode:
        queue = self._out_packet
        if len(queue) > 1:
            # Re-queue as runs of plain packets joined up to WRITE_CHUNK bytes each, the
            # others as they are, in order: paho's loop then sends one run per send().
            packets = list(queue)
            queue.clear()
            run: list[_OutPacket] = []
            size = 0
            for packet in packets:
                if not _plain(packet):
                    _queue_run(queue, run)
                    run, size = [], 0
                    queue.append(packet)
                    continue
                if run and size >= WRITE_CHUNK:
                    _queue_run(queue, run)
                    run, size = [], 0
                run.append(packet)
                size += packet["to_process"]
            _queue_run(queue, run)
        return super()._packet_write()


def _queue_run(queue: Any, run: list[_OutPacket]) -> None:
    """Append ``run`` to paho's queue as one packet (itself when alone)."""
    if len(run) == 1:
        queue.append(run[0])
    elif run:
        body = b"".join(p["packet"][p["pos"]:] for p in run)
        first = run[0]
        queue.append({"command": first["command"], "mid": first["mid"], "qos": first["qos"],
                      "pos": 0, "to_process": len(body), "packet": body, "info": None})

def _no_op(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """on_socket_register_write: nothing to register, the uplink's turn writes."""
