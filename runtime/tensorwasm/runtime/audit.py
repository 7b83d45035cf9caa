"""The audit log: one JSON line per invocation and per admin action, written off the hot path.

Owns `AuditLog`. The event loop only appends a tuple of plain values to a bounded deque (no
formatting, no I/O, no lock); past `capacity` waiting records a record is dropped and counted
(tensorwasm_audit_records_dropped_total), never waited for. One writer thread wakes at most every
`flush_s`, formats everything waiting into JSON lines and writes them with one write() per batch:
a shard at 10,000 invokes/s makes about 1/flush_s writes a second, not 10,000
(the capacity planner's audit model, tensorwasm.planner.model, uses the same figures).

Where: `stdout` (the default; what Kubernetes users collect with their node's log agent, and the
kubelet rotates it), or a file path (for a sidecar that tails it), rotated by size: at
`rotate_bytes` the file moves to `<path>.1` (older ones shift up to `<path>.<keep>`, the oldest is
deleted). Records carry who (tenant, the token's Secret key, never the token), what (function,
mode, job id), outcome (HTTP status, ok or the error kind), duration, bytes in and out, the request
id and the client address; never payloads or tokens.

Refusals (a request turned away before it ran: rate_limited, queue_full, payload_too_large, ...)
go through `refusal`, aggregated per (tenant, kind) by `RefusalWindows`: at most one line per
`refusal_window_s`, carrying `"suppressed": N` for the refusals of that tenant and kind that got no
line of their own. A tenant can make refusals at line rate, and one line each would rotate the
size-bounded log within seconds and wash out every other tenant's records; the count keeps the
total exact (each line stands for 1 + suppressed refusals). Admitted requests, jobs, cancels and
403s keep one line each.
Must not import wasmtime, cuda or aiohttp.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tensorwasm.runtime import metrics

log = logging.getLogger(__name__)

# The record, in order: (wall time, action, request id, tenant, token key, function, mode,
# HTTP status, outcome, seconds or None, bytes in, bytes out, client address, job id or "").
# A request id is the caller's X-Request-Id, or a number this shard spells "<BOOT>-<n>".
Record = tuple[float, str, str | int, str, str, str, str, int, str, float | None, int, int, str, str]
# A refusal's line with the count of the refusals of its tenant and kind it stands for besides itself.
Summary = tuple[Record, int]
BOOT = os.urandom(4).hex()  # unique per shard process


@dataclass(frozen=True)
class AuditSettings:
    """Defaults are documented in docs/runtime.md ("Audit log")."""

    target: str = "stdout"  # "stdout", "off" or a file path
    capacity: int = 65_536  # records waiting for the writer before new ones are dropped
    flush_s: float = 0.05  # the writer batches this long: writes per second <= 1 / flush_s
    rotate_bytes: int = 100 << 20  # file target: rotate at this size
    keep: int = 5  # file target: rotated files kept
    refusal_window_s: float = 1.0  # refusals: at most one line per (tenant, kind) per window
    refusal_keys: int = 4096  # (tenant, kind) windows tracked at once; past it the oldest is closed


# Every JSON key, once (the line is built by hand; format_record says which values are escaped).
_KEYS = ("ts", "type", "action", "requestId", "tenant", "tokenId", "function", "mode", "status",
         "outcome", "durationMs", "bytesIn", "bytesOut", "remote", "job")  # fmt: skip
# ... and "suppressed" on a refusal's line that stands for more refusals than itself (RefusalWindows).


class _Window:
    __slots__ = ("counted", "end", "last")

    def __init__(self, end: float) -> None:
        self.end = end
        self.counted = 0  # refusals within it that got no line
        self.last: Record | None = None  # the last of them


class RefusalWindows:
    """Per (tenant, refusal kind): the first refusal opens a window of `window_s` and gets its line;
    the next ones within it are counted, not written. When the window ends with some counted, one
    line (the last counted refusal's record) carries their number and opens the next window, so a
    flood makes one line per window; a refusal after a window closed unflushed carries the count
    itself. At most `max_keys` windows are open: a new key past it closes the oldest first (its
    count written). Thread-safe: refusals come from the event loop, `due` from the writer thread."""

    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_keys = max(1, max_keys)
        self._clock = clock
        # Insertion order is window-end order: every window lasts window_s and is inserted when it opens.
        self._open: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._open)

    def note(self, rec: Record) -> list[Summary]:
        """The lines to write for this refusal now: [] when it is counted in an open window."""
        key = (rec[3], rec[8])
        now = self._clock()
        out: list[Summary] = []
        with self._lock:
            window = self._open.get(key)
            if window is not None and now < window.end:
                window.counted += 1
                window.last = rec
                return out
            if window is not None:
                del self._open[key]
            elif len(self._open) >= self.max_keys:
                out.extend(self._close(next(iter(self._open))))
            self._open[key] = _Window(now + self.window_s)
            out.append((rec, window.counted if window is not None else 0))
        return out

    def due(self, everything: bool = False) -> list[Summary]:
        """Close the windows that ended (all of them with `everything`: the log is closing): a line
        for each that counted refusals, which opens the next window of its key."""
        now = self._clock()
        out: list[Summary] = []
        with self._lock:
            while self._open:
                key, window = next(iter(self._open.items()))
                if not everything and window.end > now:
                    break
                closed = self._close(key)
                out.extend(closed)
                if closed and not everything:
                    self._open[key] = _Window(now + self.window_s)
        return out

    def wait_s(self) -> float | None:
        """Seconds until the earliest window ends (None: none open)."""
        with self._lock:
            if not self._open:
                return None
            return max(0.0, next(iter(self._open.values())).end - self._clock())

    def _close(self, key: tuple[str, str]) -> list[Summary]:
        window = self._open.pop(key)
        if window.counted and window.last is not None:
            return [(window.last, window.counted - 1)]
        return []


class AuditLog:
    """Bounded, asynchronous JSON-lines audit log; `record` is the only hot-path call."""

    def __init__(
        self,
        settings: AuditSettings,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._queue: collections.deque[Record | Summary] = collections.deque()
        self.refusals = RefusalWindows(settings.refusal_window_s, settings.refusal_keys, clock)
        self._capacity = settings.capacity
        self._wake = threading.Event()
        self._stop = False
        self._path = None if settings.target == "stdout" else Path(settings.target)
        self._stream = stream
        self._file: IO[str] | None = None
        self._size = 0
        self.written = 0
        self.dropped = 0
        self._dropped_metric = metrics.AUDIT_RECORDS_DROPPED
        self._written_metric = metrics.AUDIT_RECORDS_WRITTEN
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    def start(self) -> AuditLog:
        if self._path is not None:
            self._open()
        self._thread.start()
        return self

    def refusal(self, rec: Record) -> None:
        """Queue a refused request's record, aggregated per (tenant, kind) (`RefusalWindows`)."""
        for line in self.refusals.note(rec):
            self.record(line[0] if line[1] == 0 else line)

    def record(self, rec: Record | Summary) -> None:
        """Queue one record (event loop); dropped and counted when the writer is this far behind."""
        q = self._queue
        if len(q) >= self._capacity:
            self.dropped += 1
            self._dropped_metric.inc()
            return
        q.append(rec)
        # Append first, then wake: the writer clears the event before it drains, so a set event seen
        # here means a drain that will take this record is still to come. (Testing for an empty
        # queue instead could lose the wake-up to a drain finishing in between, for good.)
        if not self._wake.is_set():
            self._wake.set()

    def close(self, timeout_s: float | None = 2.0) -> None:
        """Write what is queued, then stop the writer; waits at most `timeout_s` (shutdown: a
        stdout nobody reads must not hold it up; None waits for every record)."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            # Still writing (a stuck stdout): closing its file under it would kill it mid-batch.
            log.warning("Audit writer still busy at close; records queued=%d", len(self._queue))
            return
        if self._file is not None:
            self._file.close()

    # --- writer thread ---

    def _run(self) -> None:
        while True:
            # Up at a refusal window's end too: its count must not wait for the next record.
            wait = self.refusals.wait_s()
            self._wake.wait(None if wait is None else max(wait, self.settings.flush_s))
            if not self._stop:
                time.sleep(self.settings.flush_s)  # let a batch gather: one write for many records
            self._wake.clear()
            self._drain()
            if self._stop and not self._queue:
                return

    def _drain(self) -> None:
        q, lines = self._queue, []
        while q:
            lines.append(_format(q.popleft()))
        # After the queue: a window's count follows the line that opened it.
        lines.extend(format_record(rec, n) for rec, n in self.refusals.due(everything=self._stop))
        if not lines:
            return
        text = "".join(lines)
        try:
            self._write(text)
        except OSError as exc:  # a full disk or a closed stdout must not take the shard down
            self.dropped += len(lines)
            self._dropped_metric.inc(len(lines))
            log.warning("Dropped audit records count=%d error=%s", len(lines), exc)
            return
        self.written += len(lines)
        self._written_metric.inc(len(lines))

    def _write(self, text: str) -> None:
        if self._path is None:
            stream = self._stream or sys.stdout
            stream.write(text)
            stream.flush()
            return
        if self._file is None or self._size + len(text) > self.settings.rotate_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(text)
        self._file.flush()
        self._size += len(text)

    def _open(self) -> None:
        assert self._path is not None
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 (kept open; closed in close())
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self._path is not None
        if self._file is not None:
            self._file.close()
            self._file = None
            if self._size:
                for i in range(self.settings.keep - 1, 0, -1):
                    older = self._path.with_name(f"{self._path.name}.{i}")
                    if older.exists():
                        os.replace(older, self._path.with_name(f"{self._path.name}.{i + 1}"))
                os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        self._open()


_second: list[Any] = [-1, ""]  # (whole second, its "YYYY-mm-ddTHH:MM:SS"): one strftime a second


def _quoted(value: str) -> str:
    """A JSON string; escaped only when it needs it (the common value is plain)."""
    if '"' in value or "\\" in value or not value.isprintable():
        return json.dumps(value)
    return f'"{value}"'


def _format(item: Record | Summary) -> str:
    if len(item) == 2:
        return format_record(item[0], item[1])
    return format_record(item)


def format_record(r: Record, suppressed: int = 0) -> str:
    """One JSON line (also what tests parse). The action, mode, outcome and tenant come from closed
    alphabets the runtime checked; the request id, token id, remote address and function name can
    carry what a client or a module chose (an export may be named `f","tenant":"other`), so they are
    escaped when they need it."""
    ts = r[0]
    sec = int(ts)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    rid = r[2]
    rid = f'"{BOOT}-{rid}"' if isinstance(rid, int) else _quoted(rid)
    duration = "null" if r[9] is None else f"{r[9] * 1000:.3f}"
    return (
        f'{{"ts":"{_second[1]}.{int((ts - sec) * 1000):03d}Z","type":"audit","action":"{r[1]}",'
        f'"requestId":{rid},"tenant":"{r[3]}","tokenId":{_quoted(r[4])},"function":{_quoted(r[5])},'
        f'"mode":"{r[6]}","status":{r[7]},"outcome":"{r[8]}","durationMs":{duration},"bytesIn":{r[10]},'
        f'"bytesOut":{r[11]},"remote":{_quoted(r[12])},"job":"{r[13]}"'
        + (f',"suppressed":{suppressed}}}\n' if suppressed else "}\n")
    )


def wall() -> float:
    return time.time()
