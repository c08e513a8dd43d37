"""HQ for a fleet: many sites into 1, 2, 4 ``edge-agent hq`` receivers (issue 12).

Prints one JSON object. Everything runs on loopback: a private mosquitto, a
private PostgreSQL (``fsync`` on, so its commits are durable), real ``edge-agent
hq`` processes, and a **site simulator**: many lightweight sites in one asyncio
process speaking the real protocol over a small MQTT 5 client written here
(the envelopes of ``agent.envelope.encode`` with per-site seqs and stable ids,
QoS 1 publishes, a retained ``online`` status with an ``offline`` will, HQ's
cumulative acks on ``P/acks`` checked for HQ's proof with the site's derived
key, at most ``mqtt.max_inflight`` (2000) events out without HQ's ack, and the
agent's resend rule: from the first unacked seq when the acks stop moving for
``ack_timeout_s``, each unanswered resend doubling the wait (capped, jittered;
``agent.uplink.ledger.backed_off_ack_wait``), an advancing ack resetting it).

- ``throughput``: 200 sites each publish ``--events`` sales at once; events
  stored and acked per second (the clock stops when every site holds the ack of
  its last seq) with 1, 2 and 4 receivers, on PostgreSQL and on SQLite; CPU
  seconds per 1,000 events of the receivers, the broker and the database.
  Baseline, same broker, same run: ``mosquitto_pub -q 1 -l`` into
  ``mosquitto_sub -q 1``, as many messages of the envelopes' size. Goal: the
  best receiver count >= 0.5 of it.
- ``storm``: 200 sites, each with a ``--backlog``-event backlog (5,000 is the
  issue's figure), connect at once: the time until all is stored and acked,
  the peak RSS (VmHWM) of the broker and of each receiver, the resends and the
  duplicates HQ stored a count of. ``--window`` sets the sites' HQ-ack window
  (``--window 5000``: a site pushes its whole backlog, as the simulator did
  before it followed the agent's window).

Usage: python bench/hq_bench.py [throughput] [storm] [--sites 200] [--events 100]
       [--backlog 5000] [--storm-receivers 2] [--window 2000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import proof
from agent.envelope import encode, iso_ms
from agent.testing.localbroker import Broker, start_broker
from agent.testing.localpg import PgServer, start_pg
from agent.testing.localsite import Proc, edge_agent_argv, sample_sale, write_toml
from agent.uplink.ledger import backed_off_ack_wait

PREFIX = "edge"
PUBACK_WINDOW = 100       # QoS 1 publishes a simulated site has out without the broker's PUBACK
HQ_WINDOW = 2000          # events out without HQ's ack: the agent's mqtt.max_inflight default
ACK_TIMEOUT_S = 30.0      # the agent's default: resend from the first unacked seq after this
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- a small MQTT 5 client (only what a site needs) ---------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, will_topic: str, will: bytes) -> bytes:
    # Clean start, will QoS 1 retained, keepalive 0 (the bench ends before any idle).
    flags = 0x02 | 0x04 | 0x08 | 0x20
    props = b"\x21" + struct.pack("!H", 1000)        # receive maximum
    body = (_str("MQTT") + b"\x05" + bytes([flags]) + struct.pack("!H", 0)
            + _varint(len(props)) + props + _str(client_id)
            + b"\x00" + _str(will_topic) + _str(will))
    return _packet(0x10, body)


def publish_packet(topic: bytes, pid: int, payload: bytes, retain: bool = False) -> bytes:
    return _packet(0x32 | (0x01 if retain else 0), _str(topic) + struct.pack("!H", pid)
                   + b"\x00" + payload)


def subscribe_packet(pid: int, topic: str) -> bytes:
    return _packet(0x82, struct.pack("!H", pid) + b"\x00" + _str(topic) + b"\x01")


class SimSite(asyncio.Protocol):
    """One site: publishes seqs 1..total of kind sale, follows HQ's acks."""

    def __init__(self, index: int, total: int, key: bytes | None, data: str,
                 done: Callable[[SimSite], None], window: int = HQ_WINDOW) -> None:
        self.index = index
        self.window = window
        self.site = f"sim-{index:04d}"
        self.total = total
        self.key = key
        self.data = data
        self.done = done
        self.topic = f"{PREFIX}/{self.site}/events/sale".encode()
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.connected = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.next_seq = 1            # the next seq to publish
        self.acked = 0               # HQ's watermark, as its acks say
        self.inflight: dict[int, int] = {}   # packet id -> seq, awaiting PUBACK
        self.pid = 0
        self.acks = self.bad_proofs = self.resends = self.published = 0
        self.last_progress = time.monotonic()
        self.timeouts = 0            # ack timeouts in a row (the agent's backoff)
        self.ack_wait = ACK_TIMEOUT_S
        self.backoff_upto = 0        # highest seq sent before the last timeout
        self.max_sent = 0
        self.first_ack_at: float | None = None
        self.finished_at: float | None = None

    # -- envelopes ------------------------------------------------------------------
    def envelope(self, seq: int) -> bytes:
        # A stable id per (site, seq): a resend carries the same id, as the agent's does.
        event_id = f"0190{self.index:04x}-{seq >> 32 & 0xFFFF:04x}-7{seq >> 20 & 0xFFF:03x}-" \
                   f"8{seq >> 8 & 0xFFF:03x}-{seq & 0xFF:02x}{self.index:010x}"
        return encode(event_id=event_id, site=self.site, kind="sale", seq=seq,
                      ts=iso_ms(time.time()), source="pos-1", data_json=self.data)

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        will = json.dumps({"state": "offline", "ts": iso_ms(time.time()),
                           "version": "sim"}).encode()
        transport.write(connect_packet(f"edge-{self.site}", f"{PREFIX}/{self.site}/status",
                                       will))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            length = mult = 0
            pos = 1
            while True:
                if pos >= len(buf):
                    return
                byte = buf[pos]
                length += (byte & 0x7F) << mult
                pos += 1
                mult += 7
                if not byte & 0x80:
                    break
            if len(buf) < pos + length:
                return
            kind = buf[0] >> 4
            body = bytes(buf[pos:pos + length])
            del buf[:pos + length]
            self._packet(kind, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"{self.site}: connection lost"))

    # -- packets --------------------------------------------------------------------
    def _packet(self, kind: int, body: bytes) -> None:
        if kind == 4:  # PUBACK of our publish
            seq = self.inflight.pop(struct.unpack_from("!H", body)[0], None)
            if seq is not None:
                self._fill()
        elif kind == 3:  # PUBLISH (QoS 1): HQ's ack
            n = struct.unpack_from("!H", body)[0]
            topic_end = 2 + n
            pid = struct.unpack_from("!H", body, topic_end)[0]
            pos = topic_end + 2
            plen = mult = 0
            while True:
                byte = body[pos]
                plen += (byte & 0x7F) << mult
                pos += 1
                mult += 7
                if not byte & 0x80:
                    break
            assert self.transport is not None
            self.transport.write(b"\x40\x02" + struct.pack("!H", pid))
            self._ack(body[pos + plen:])
        elif kind == 2:  # CONNACK
            if body[1] != 0:
                self.connected.set_exception(ConnectionError(f"{self.site}: CONNACK {body[1]}"))
            else:
                self.connected.set_result(None)
        elif kind == 9:  # SUBACK
            self.subscribed.set_result(body[-1])

    def _ack(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if self.key is not None and not proof.verify(self.key, self.site, "acks", message):
            self.bad_proofs += 1  # the agent ignores an ack without HQ's proof
            return
        upto = message.get("upto")
        if message.get("kind") != "sale" or not isinstance(upto, int) or upto <= self.acked:
            return
        self.acks += 1
        self.acked = upto
        self.next_seq = max(self.next_seq, upto + 1)
        self.last_progress = time.monotonic()
        if self.first_ack_at is None:
            self.first_ack_at = self.last_progress
        if upto > self.backoff_upto:   # the agent's reset (Karn's rule)
            self.timeouts, self.ack_wait = 0, ACK_TIMEOUT_S
        if self.acked >= self.total and self.finished_at is None:
            self.finished_at = time.monotonic()
            self.done(self)
            return
        self._fill()   # the HQ-ack window opened

    def _fill(self) -> None:
        """Publish while fewer than PUBACK_WINDOW wait for the broker's PUBACK and fewer
        than ``window`` for HQ's ack (the agent's mqtt.max_inflight)."""
        assert self.transport is not None
        out = []
        while len(self.inflight) < PUBACK_WINDOW and self.next_seq <= self.total \
                and self.next_seq - self.acked <= self.window:
            self.pid = self.pid % 65535 + 1
            self.inflight[self.pid] = self.next_seq
            out.append(publish_packet(self.topic, self.pid, self.envelope(self.next_seq)))
            self.max_sent = max(self.max_sent, self.next_seq)
            self.next_seq += 1
            self.published += 1
        if out:
            self.transport.write(b"".join(out))

    # -- driving --------------------------------------------------------------------
    async def start(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, "127.0.0.1", port)
        await self.connected
        assert self.transport is not None
        self.transport.write(subscribe_packet(1, f"{PREFIX}/{self.site}/acks"))
        await self.subscribed
        status = json.dumps({"state": "online", "ts": iso_ms(time.time()), "version": "sim"})
        self.pid = 1
        self.transport.write(publish_packet(f"{PREFIX}/{self.site}/status".encode(), 2,
                                            status.encode(), retain=True))
        self.pid = 2

    def go(self) -> None:
        self.last_progress = time.monotonic()
        self._fill()

    def check_resend(self, now: float) -> None:
        """The agent's rule: acks stuck for the ack wait with events out: resend from the
        first unacked seq, and double the wait (``DeliveryLedger.ack_timed_out``)."""
        if self.finished_at is None and now - self.last_progress > self.ack_wait \
                and self.next_seq > self.acked + 1:
            self.resends += 1
            self.timeouts += 1
            self.backoff_upto = self.max_sent
            self.ack_wait = backed_off_ack_wait(ACK_TIMEOUT_S, self.timeouts, random.random)
            self.next_seq = self.acked + 1
            self.last_progress = now
            self._fill()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.write(b"\xe0\x00")
            self.transport.close()


async def simulate(port: int, sites: int, per_site: int, master: bytes | None,
                   deadline_s: float, window: int = HQ_WINDOW) -> dict[str, Any]:
    """Connect ``sites`` sites, then let them all publish; figures once all are acked."""
    data = json.dumps(sample_sale(1), separators=(",", ":"))
    all_done = asyncio.Event()
    finished = 0

    def done(_site: SimSite) -> None:
        nonlocal finished
        finished += 1
        if finished == sites:
            all_done.set()

    sims = [SimSite(i, per_site, None if master is None else
                    proof.derive_site_key(master, f"sim-{i:04d}"), data, done, window)
            for i in range(sites)]
    await asyncio.gather(*(s.start(port) for s in sims))
    started = time.monotonic()
    for s in sims:
        s.go()

    async def watchdog() -> None:
        tick = 0
        while not all_done.is_set():
            now = time.monotonic()
            for s in sims:
                s.check_resend(now)
            tick += 1
            if tick % 10 == 0:   # progress on stderr, every 10 s
                print(f"hq_bench: {now - started:.0f} s: acked "
                      f"{sum(s.acked for s in sims)}/{sites * per_site}, sites with an ack "
                      f"{sum(1 for s in sims if s.first_ack_at)}, resends "
                      f"{sum(s.resends for s in sims)}, published "
                      f"{sum(s.published for s in sims)}", file=sys.stderr)
            await asyncio.sleep(1.0)

    dog = asyncio.create_task(watchdog())
    try:
        await asyncio.wait_for(all_done.wait(), deadline_s)
        ok = True
    except TimeoutError:
        ok = False
    dog.cancel()
    elapsed = time.monotonic() - started
    for s in sims:
        s.close()
    ends = sorted(s.finished_at - started for s in sims if s.finished_at is not None)
    firsts = [s.first_ack_at - started for s in sims if s.first_ack_at is not None]
    return {"ok": ok, "elapsed_s": elapsed, "sites_done": len(ends),
            "last_site_s": round(ends[-1], 3) if ends else None,
            "median_site_s": round(statistics.median(ends), 3) if ends else None,
            "acks": sum(s.acks for s in sims), "bad_proofs": sum(s.bad_proofs for s in sims),
            "resends": sum(s.resends for s in sims),
            "first_ack_s": {"median": round(statistics.median(firsts), 3) if firsts else None,
                            "max": round(max(firsts), 3) if firsts else None},
            "sites_that_resent": sum(1 for s in sims if s.resends),
            "events_published": sum(s.published for s in sims),
            "envelope_bytes": len(sims[0].envelope(1))}


# -- processes: CPU and RSS from /proc ---------------------------------------------------


def cpu_s(pids: list[int]) -> float:
    """utime + stime of the processes and their reaped children, in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


def tree(pid: int) -> list[int]:
    """A process and its descendants (PostgreSQL's backends are children)."""
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += tree(int(child))
    return out


def hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class Hq:
    """``n`` real ``edge-agent hq`` receivers on one store, acks with proof."""

    def __init__(self, work: Path, port: int, store: str, n: int, master: Path,
                 max_inflight: int | None = None) -> None:
        self.config = work / "hq.toml"
        mqtt: dict[str, Any] = {"hosts": ["127.0.0.1"], "port": port, "tls": False,
                                "keepalive_s": 30, "backoff_min_s": 0.1, "backoff_max_s": 1.0}
        if max_inflight is not None:
            mqtt["max_inflight"] = max_inflight   # the receivers' own QoS 1 acks in flight
        write_toml(self.config, {
            "mqtt": mqtt,
            # A share group of its own: no session of an earlier run takes a share.
            "hq": {"store": store, "http_port": 0, "master_key_file": str(master),
                   "share_group": f"hq{secrets.token_hex(4)}"},
        })
        self.procs = [Proc([*edge_agent_argv(), "hq", "--config", str(self.config)],
                           str(work / f"hq-{i}.log")).start() for i in range(n)]

    def wait_connected(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            while "connected to" not in proc.log_tail(400):
                if not proc.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"edge-agent hq did not connect:\n{proc.log_tail()}")
                time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [p.popen.pid for p in self.procs if p.popen is not None]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()


# -- the runs -------------------------------------------------------------------------


def run_sim(broker: Broker, hq: Hq, pg: PgServer | None, sites: int, per_site: int,
            master: bytes, deadline_s: float, window: int = HQ_WINDOW) -> dict[str, Any]:
    assert broker.proc is not None
    watch = {"receivers": hq.pids, "broker": [broker.proc.pid]}
    if pg is not None:
        watch["postgresql"] = tree(pg.proc.pid)
    before = {name: cpu_s(pids) for name, pids in watch.items()}
    self_before = time.process_time()
    result = asyncio.run(simulate(broker.port, sites, per_site, master, deadline_s, window))
    if pg is not None:
        watch["postgresql"] = tree(pg.proc.pid)
    events = sites * per_site
    cpu = {name: cpu_s(pids) - before[name] for name, pids in watch.items()}
    cpu["simulator"] = time.process_time() - self_before
    result.update({
        "events": events,
        "stored_and_acked_per_s": round(events / result["elapsed_s"]) if result["ok"] else 0,
        "cpu_s_per_1000": {k: round(v / events * 1000, 4) for k, v in cpu.items()},
        "elapsed_s": round(result["elapsed_s"], 3),
    })
    return result


def baseline(broker: Broker, count: int, size: int) -> dict[str, Any]:
    """``mosquitto_pub -q 1 -l`` into ``mosquitto_sub -q 1``: the same count and size."""
    topic = f"bench/base-{secrets.token_hex(3)}"
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q",
                            "1", "-t", topic], stdout=subprocess.PIPE)
    assert sub.stdout is not None
    first: list[bytes] = []
    reader = threading.Thread(target=lambda: first.append(sub.stdout.readline()  # type: ignore[union-attr]
                                                          ), daemon=True)
    reader.start()
    # Probe until the subscription is in place (the first line arrives).
    while reader.is_alive():
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                        "-t", topic, "-m", "probe"], check=True)
        reader.join(0.1)
    line = b"x" * (size - 1) + b"\n"
    got = 0
    done = threading.Event()

    def count_lines() -> None:
        nonlocal got
        assert sub.stdout is not None
        for received in sub.stdout:
            if received.startswith(b"x"):
                got += 1
                if got == count:
                    done.set()
                    return

    counter = threading.Thread(target=count_lines, daemon=True)
    counter.start()
    cpu_before = cpu_s([broker.proc.pid, sub.pid])
    started = time.monotonic()
    pub = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
                          "-t", topic, "-l"], input=line * count, check=True)
    assert pub.returncode == 0
    done.wait(300)
    elapsed = time.monotonic() - started
    cpu = cpu_s([broker.proc.pid, sub.pid]) - cpu_before
    sub.terminate()
    sub.wait(10)
    return {"messages": count, "bytes": size, "elapsed_s": round(elapsed, 3),
            "per_s": round(count / elapsed), "received": got,
            "cpu_s_per_1000_broker_and_sub": round(cpu / count * 1000, 4)}


def bench_throughput(work: Path, broker: Broker, pg: PgServer, master: Path, sites: int,
                     per_site: int, counts: list[int]) -> dict[str, Any]:
    master_key = proof.read_master_key(str(master))
    runs: dict[str, dict[str, Any]] = {}
    size = None
    for backend in ("postgresql", "sqlite"):
        for n in counts:
            name = f"{backend}-{n}"
            run_dir = work / name
            run_dir.mkdir()
            store = (pg.create_database(name.replace("-", "_")) if backend == "postgresql"
                     else f"sqlite:///{run_dir}/hq.db")
            hq = Hq(run_dir, broker.port, store, n, master)
            try:
                hq.wait_connected()
                runs[name] = run_sim(broker, hq, pg if backend == "postgresql" else None,
                                     sites, per_site, master_key, 600)
                size = runs[name]["envelope_bytes"]
            finally:
                hq.stop()
            print(f"hq_bench: {name}: {runs[name]['stored_and_acked_per_s']}/s",
                  file=sys.stderr)
    assert size is not None
    base = baseline(broker, sites * per_site, size)
    best_name = max(runs, key=lambda k: runs[k]["stored_and_acked_per_s"])
    best = runs[best_name]["stored_and_acked_per_s"]
    return {"sites": sites, "events_per_site": per_site, "runs": runs,
            "baseline_mosquitto_pub_sub_q1": base, "best": best_name,
            "best_ratio": round(best / base["per_s"], 3),
            "ratios": {k: round(v["stored_and_acked_per_s"] / base["per_s"], 3)
                       for k, v in runs.items()},
            "goal": "best ratio >= 0.5"}


def stored_and_duplicates(store: str) -> tuple[int, int]:
    """Rows in HQ's PostgreSQL store, and the redeliveries it counted on them."""
    import psycopg

    with psycopg.connect(store) as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(dups), 0) FROM events").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def bench_storm(work: Path, broker: Broker, pg: PgServer, master: Path, sites: int,
                backlog: int, receivers: int, window: int = HQ_WINDOW,
                deadline_s: float = 3600, hq_max_inflight: int | None = None) -> dict[str, Any]:
    store = pg.create_database("storm")
    run_dir = work / "storm"
    run_dir.mkdir()
    hq = Hq(run_dir, broker.port, store, receivers, master, hq_max_inflight)
    try:
        hq.wait_connected()
        result = run_sim(broker, hq, pg, sites, backlog, proof.read_master_key(str(master)),
                         deadline_s, window)
        result["peak_rss_mb"] = {"broker": hwm_mb(broker.proc.pid),
                                 "receivers": [hwm_mb(p) for p in hq.pids]}
        result["stored_rows"], result["duplicates_counted_by_hq"] = \
            stored_and_duplicates(store)
    finally:
        hq.stop()
    result.update({"sites": sites, "backlog_per_site": backlog, "receivers": receivers,
                   "store": "postgresql", "hq_ack_window": window,
                   "ack_timeout_s": ACK_TIMEOUT_S,
                   "hq_mqtt_max_inflight": hq_max_inflight or "default (2000)"})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("which", nargs="*", default=["throughput", "storm"])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--events", type=int, default=100, help="sales per site (throughput)")
    parser.add_argument("--backlog", type=int, default=5000, help="backlog per site (storm)")
    parser.add_argument("--receivers", default="1,2,4")
    parser.add_argument("--storm-receivers", type=int, default=2)
    parser.add_argument("--window", type=int, default=HQ_WINDOW,
                        help="events a site has out without HQ's ack (mqtt.max_inflight)")
    parser.add_argument("--hq-max-inflight", type=int, default=None,
                        help="the receivers' mqtt.max_inflight (before branch h12ack it bounded "
                             "their QoS 1 acks in flight; now acks go on their own link)")
    parser.add_argument("--storm-deadline", type=float, default=3600,
                        help="give the storm up after this many seconds")
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.sites, args.events, args.backlog = 20, 20, 100
    work = Path(tempfile.mkdtemp(prefix="hq-bench-"))
    master = work / "hq-master.key"
    master.write_text(secrets.token_hex(32) + "\n", encoding="ascii")
    master.chmod(0o600)
    (work / "broker").mkdir()
    broker = start_broker(str(work / "broker"))
    pg = start_pg(fsync=True)
    out: dict[str, Any] = {"bench": "hq", "cpus": os.cpu_count(),
                           "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        if "throughput" in args.which:
            out["throughput"] = bench_throughput(
                work, broker, pg, master, args.sites, args.events,
                [int(n) for n in args.receivers.split(",")])
        if "storm" in args.which:
            out["storm"] = bench_storm(work, broker, pg, master, args.sites, args.backlog,
                                       args.storm_receivers, args.window, args.storm_deadline,
                                       args.hq_max_inflight)
    finally:
        pg.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
