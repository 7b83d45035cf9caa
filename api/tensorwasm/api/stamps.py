"""RFC 3339 stamps as the API writes them (whole seconds, UTC, "Z"), and their parsing.

Pure apart from reading the clock in `now_rfc3339`; standard library only.
"""

from __future__ import annotations

import datetime


def format_rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    return format_rfc3339(datetime.datetime.now(datetime.UTC))


def parse_rfc3339(value: str) -> datetime.datetime:
    """A stamp the API server wrote (second precision, "Z")."""
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
