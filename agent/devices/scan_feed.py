"""The live scan feed: every connected /v1/scans client with a bounded queue (drop-oldest).

The scanners family publishes each scan here from the event loop; the WebSocket
route (agent/web/scanning_routes.py) joins clients to it and sends what they queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging

log = logging.getLogger(__name__)


CLIENT_QUEUE_MAX = 256  # messages a client may fall behind before the oldest are dropped


class FeedClient:
    """One WebSocket client: a bounded queue (drop-oldest) its sender task empties."""

    def __init__(self, name: str, peer: str, maxlen: int = CLIENT_QUEUE_MAX) -> None:
        self.name = name
        self.peer = peer
        self.maxlen = maxlen
        self.queue: collections.deque[str] = collections.deque()
        self.wake = asyncio.Event()
        self.closed = False
        self.sent = 0
        self.dropped = 0

    def offer(self, text: str) -> bool:
        """Queue a message; False when the oldest had to be dropped for it."""
        dropped = len(self.queue) >= self.maxlen
        if dropped:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(text)
        self.wake.set()
        return not dropped

    async def next(self) -> str | None:
        """The next message to send; None once the feed is closed and the queue empty."""
        while not self.queue:
            if self.closed:
                return None
            self.wake.clear()
            await self.wake.wait()
        return self.queue.popleft()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class ScanFeed:
    """The connected ``/v1/scans`` clients; all of it runs in the event loop."""

    def __init__(self, maxlen: int = CLIENT_QUEUE_MAX) -> None:
        self.maxlen = maxlen
        self.clients: set[FeedClient] = set()
        self.closed = False
        self.published = 0
        self.dropped = 0  # over every client, also those gone since

    def join(self, name: str, peer: str) -> FeedClient:
        client = FeedClient(name, peer, self.maxlen)
        if self.closed:
            client.close()
        self.clients.add(client)
        return client

    def leave(self, client: FeedClient) -> None:
        self.clients.discard(client)

    def publish(self, text: str) -> None:
        """Hand one message to every client; never waits."""
        self.published += 1
        for client in self.clients:
            if not client.offer(text):
                self.dropped += 1
                if client.dropped == 1:
                    log.warning("scans: WebSocket client %s (%s) is not keeping up; its oldest "
                                "scans are dropped", client.name, client.peer)

    def close(self) -> None:
        """Tell every client to go away (the daemon is stopping)."""
        self.closed = True
        for client in self.clients:
            client.close()
