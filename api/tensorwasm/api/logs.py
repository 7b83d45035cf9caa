"""One log format for every TensorWasm process (operator, runtime shard): `text` or `json`.

Owns the line layout and the root logger's set-up. `text` is for people (time level logger message),
`json` one object per line for log pipelines (time, level, logger, message, exception). Both
processes take `--log-format` (and their TENSORWASM_*_LOG_FORMAT variable) and call
`configure_logging`. Pure standard library; imports nothing of the project.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (RFC 3339, UTC, ms), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, Any] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def check_format(value: str) -> str:
    """`value` lower-cased if it names a format; ValueError naming the choices otherwise."""
    fmt = value.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"must be text or json, got {value!r}")
    return fmt


def configure_logging(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Root logger at `level` writing `fmt` lines to `stream` (stderr); replaces earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if check_format(fmt) == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
