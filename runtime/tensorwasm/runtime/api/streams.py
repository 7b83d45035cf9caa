"""Streamed invocations (`POST .../invoke?mode=stream`): the bounded buffer between a guest and a
slow client, and the Server-Sent Events framing.

Owns `StreamBuffer` (the sink a streaming guest's `stream_write` fills on its worker thread and the
request handler drains on the event loop) and `sse_event`. Back-pressure: the buffer holds at most
`buffer_bytes`; a write that does not fit waits (the worker thread, never the loop) until the
handler has drained it, and the handler drains only as fast as aiohttp can hand bytes to the
client's socket. A guest that waits longer than `stall_s` is stopped with guest_limit_exceeded
(limit streamStallSeconds); a client that goes away marks the buffer gone and the guest is stopped
with `cancelled` at its next write. The shard never holds more than `buffer_bytes` per stream.
Must not import wasmtime or cuda.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from tensorwasm.runtime.errors import Cancelled, GuestLimitExceeded, RuntimeFault

SSE_CONTENT_TYPE = "text/event-stream"


@dataclass(frozen=True)
class StreamLimits:
    """Defaults are documented in docs/runtime.md ("Streaming")."""

    buffer_bytes: int = 1 << 20  # guest output waiting for the client, per stream
    stall_s: float = 10.0  # a write may wait this long for room before the guest is stopped


class StreamBuffer:
    """Chunks from one guest (worker thread) to one HTTP response (event loop), bounded."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: StreamLimits, max_total: int) -> None:
        self.limits = limits
        self.max_total = max_total  # the tenant's maxOutputBytes: the whole stream, not one chunk
        self._loop = loop
        self._cond = threading.Condition()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self.total = 0
        self.gone = False
        self._fault: RuntimeFault | None = None
        self._ready = asyncio.Event()
        self._wake_pending = False

    # --- worker thread (the guest's stream_write) ---

    def write(self, data: bytes) -> None:
        n = len(data)
        with self._cond:
            if self.total + n > self.max_total:
                raise GuestLimitExceeded(
                    f"the stream passed the tenant's {self.max_total}-byte output limit",
                    limit="maxOutputBytes",
                    value=self.max_total,
                )
            until = time.monotonic() + self.limits.stall_s
            # A chunk larger than the whole buffer still goes once the buffer is empty.
            while not self.gone and self._held and self._held + n > self.limits.buffer_bytes:
                left = until - time.monotonic()
                if left <= 0:
                    raise GuestLimitExceeded(
                        f"the client read none of {self._held} buffered stream bytes for "
                        f"{self.limits.stall_s:g} s",
                        limit="streamStallSeconds",
                        value=self.limits.stall_s,
                    )
                self._cond.wait(left)
            if self.gone:
                raise self._fault or Cancelled("the streaming client went away")
            self._chunks.append(data)
            self._held += n
            self.total += n
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is going away
                self._loop.call_soon_threadsafe(self._ready.set)

    # --- event loop (the handler) ---

    async def ready(self) -> None:
        await self._ready.wait()

    def take(self) -> list[bytes]:
        """Everything buffered now; frees the room (a waiting write resumes)."""
        with self._cond:
            self._ready.clear()
            self._wake_pending = False
            chunks = list(self._chunks)
            self._chunks.clear()
            self._held = 0
            self._cond.notify_all()
        return chunks

    def close(self, fault: RuntimeFault | None = None) -> None:
        """The client went away (or the response ended): writes from now on stop the guest, with
        `fault` as its error (default: cancelled)."""
        with self._cond:
            if fault is not None and not self.gone:
                self._fault = fault
            self.gone = True
            self._chunks.clear()
            self._held = 0
            self._cond.notify_all()


def sse_event(event: str, data: str) -> bytes:
    """One Server-Sent Event; `data` may hold newlines (each becomes a data: line)."""
    lines = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"event: {event}\n{lines}\n".encode()


def sse_chunk(chunk: bytes) -> bytes:
    """A guest chunk: `text` when it is UTF-8 without CR (exact round trip), else `bytes` (base64)."""
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\r" not in text:
        return sse_event("text", text)
    return sse_event("bytes", base64.b64encode(chunk).decode())


def sse_json(event: str, body: dict[str, Any]) -> bytes:
    return sse_event(event, json.dumps(body, separators=(",", ":")))
