"""Which live shard removes a deleted Snapshot's blob (the store is shared by all shards)."""

from __future__ import annotations

from typing import Any

from tensorwasm.api.names import shard_sort_key
from tensorwasm.runtime.snapshots.kube import blob_deleter


def snap(captured_by: str | None) -> dict[str, Any]:
    return {"metadata": {"name": "s"}, "status": {"shard": captured_by} if captured_by else {}}


def test_the_capturing_shard_when_live() -> None:
    live = {"tw-shard-0", "tw-shard-1", "tw-shard-2"}
    assert blob_deleter(snap("tw-shard-2"), live) == "tw-shard-2"
    # Every shard decides from the Snapshot alone, so all of them name the same one.
    assert {blob_deleter(snap("tw-shard-1"), live) for _ in live} == {"tw-shard-1"}


def test_capturing_shard_gone_falls_to_the_lowest_ordinal_live_shard() -> None:
    # Numeric, not lexical: shard-2 comes before shard-10.
    live = {"tw-shard-10", "tw-shard-2"}
    assert blob_deleter(snap("tw-shard-0"), live) == "tw-shard-2"
    assert blob_deleter(snap(None), live) == "tw-shard-2"  # never captured


def test_no_live_shard_means_nobody_acts() -> None:
    assert blob_deleter(snap("tw-shard-0"), set()) is None


def test_shard_ordinal_sorts_names_without_an_ordinal_last() -> None:
    assert sorted(["b", "x-3", "x-12", "x-0"], key=shard_sort_key) == ["x-0", "x-3", "x-12", "b"]
