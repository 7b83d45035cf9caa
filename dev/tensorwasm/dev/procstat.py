"""A process's /proc/<pid>/stat (Linux): its CPU time and its parent, for benchmarks and tests.

Pure reads of /proc; must not start or signal anything.
"""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """The fields after the parenthesised command name (which may itself hold spaces or ')')."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int:
    return int(stat_fields(pid)[1])
