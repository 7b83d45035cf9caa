"""The audit log's line format and writer hand-off hold against what a tenant or client chooses."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime.audit import AuditLog, AuditSettings, Record, format_record
from tests.conftest import wait_for


def _record(function: str = "echo", token_id: str = "token", remote: str = "10.0.0.7") -> Record:
    return (
        time.time(),
        "invoke",
        "r-1",
        "alpha",
        token_id,
        function,
        "sync",
        200,
        "ok",
        0.001,
        1,
        2,
        remote,
        "",
    )


@pytest.mark.parametrize(
    "function",
    [
        'f","tenant":"victim',
        'f"}\n{"type":"audit","tenant":"victim',
        "back\\slash",
        "tab\there",
        "plain_name",
    ],
)
def test_a_function_name_cannot_forge_fields_or_lines(function: str) -> None:
    # Export names are any UTF-8 and the URL's {function} is percent-decoded: `%22`, `%0A` arrive as is.
    line = format_record(_record(function=function))
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert (parsed["tenant"], parsed["function"], parsed["type"]) == ("alpha", function, "audit")


def test_token_id_and_remote_are_escaped_too() -> None:
    parsed = json.loads(format_record(_record(token_id='t"x', remote='1.2.3.4"\n')))
    assert (parsed["tokenId"], parsed["remote"], parsed["tenant"]) == ('t"x', '1.2.3.4"\n', "alpha")


def test_a_record_never_waits_unwoken_in_the_queue() -> None:
    # The state a writer leaves after clearing its event and draining: records queued, event clear.
    # A record must wake it; testing for an empty queue instead left the log stuck for good when a
    # drain emptied the queue between that test and the append.
    audit = AuditLog(AuditSettings())
    audit._queue.append(_record())
    audit._wake.clear()
    audit.record(_record())
    assert audit._wake.is_set()


class _BlockingFile:
    """A file whose writes wait for `release` (a stuck disk or pipe)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return int(self.inner.write(text))

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


def test_close_leaves_a_busy_writer_its_file(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value)  # type: ignore[assignment,return-value]
    try:
        audit = AuditLog(AuditSettings(target=str(tmp_path / "a.log"), flush_s=0.0)).start()
        blocking = _BlockingFile(audit._file)
        audit._file = blocking  # type: ignore[assignment]
        audit.record(_record())
        assert blocking.entered.wait(30), "the writer never wrote"
        audit.close(timeout_s=0.01)  # returns while the writer is inside write()
        blocking.release.set()
        wait_for(lambda: not audit._thread.is_alive(), 30, "the writer to finish its batch")
    finally:
        threading.excepthook = previous
    assert errors == [] and audit.written == 1 and audit.dropped == 0
    assert json.loads((tmp_path / "a.log").read_text())["function"] == "echo"
