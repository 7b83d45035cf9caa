"""One log format across the operator and the runtime: `--log-format json` gives one JSON object per line.

Both real processes run here (the runtime standalone from examples/tenants.yaml on a free port; the
operator pointed at nothing, so it logs its start and exits): every line they write is parsed.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tensorwasm.api.logs import configure_logging

REPO = Path(__file__).resolve().parents[2]


def test_json_lines_carry_time_level_logger_message_and_the_traceback() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    try:
        logging.getLogger("tensorwasm.test").info("Placed Tenant name=%s", "a")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("tensorwasm.test").exception("Failed")
        logging.getLogger("tensorwasm.test").debug("not shown")
    finally:
        configure_logging("warning", "text")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["level"], x["logger"], x["message"]) for x in lines] == [
        ("INFO", "tensorwasm.test", "Placed Tenant name=a"),
        ("ERROR", "tensorwasm.test", "Failed"),
    ]
    assert lines[0]["time"].endswith("Z") and "RuntimeError: boom" in lines[1]["exception"]


def test_an_unknown_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="must be text or json, got 'xml'"):
        configure_logging("info", "xml")


def test_the_runtime_writes_json_lines() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorwasm.runtime", "--tenants-file", "examples/tenants.yaml",
         "--listen", "127.0.0.1:0", "--admin-listen", "off", "--accelerator", "cpu", "--log-format", "json"],
        cwd=REPO, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[dict[str, str]] = []
    try:
        # Up to the "Runtime listening" line, whatever the machine's speed (EOF ends it if it dies).
        for line in proc.stderr:
            seen.append(json.loads(line))
            if seen[-1]["message"].startswith("Runtime listening"):
                break
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    assert seen and seen[-1]["logger"] == "tensorwasm.runtime", seen
    assert seen[-1]["message"].startswith("Runtime listening")
    for line in rest.splitlines():
        json.loads(line)
