"""Why an image build failed, said so a person can act on it: a missing Debian package or wheel.

Owns BuildError (every builder module raises it) and the reading of a failed step's output. Pure:
no I/O. Must import nothing but the standard library.
"""

from __future__ import annotations

import re


class BuildError(RuntimeError):
    """The image cannot be built; the message says what is missing or which step failed."""


_MISSING_PATTERNS = (
    (re.compile(r"Unable to locate package (\S+)"), "Debian package"),
    (re.compile(r"Package '?(\S+?)'? has no installation candidate"), "Debian package"),
    (re.compile(r"No matching distribution found for (\S+)"), "wheel"),
    (re.compile(r"Could not find a version that satisfies the requirement (\S+)"), "wheel"),
)


def diagnose(output: str) -> list[str]:
    """Name what a failed RUN was missing (Debian packages, wheels) from its output."""
    found: list[str] = []
    for pattern, kind in _MISSING_PATTERNS:
        for match in pattern.finditer(output):
            line = f"missing {kind}: {match.group(1)}"
            if line not in found:
                found.append(line)
    return found
