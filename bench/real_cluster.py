"""The cluster a real-node benchmark measures on (not a benchmark: run.py runs bench_*.py only).

Owns the choice every chart-on-the-real-node benchmark makes: a running cluster named by
TENSORWASM_BENCH_CLUSTER_DIR (its CRDs applied; it stays up), else one of its own with one real node,
removed after. Imports tensorwasm.dev only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tensorwasm.dev.cluster import ClusterState, LocalControlPlane, default_state_dir


@contextmanager
def bench_cluster(own_dir: str) -> Iterator[tuple[LocalControlPlane, ClusterState, str | None]]:
    """(plane, state, the reused directory or None); `own_dir` names the cluster of its own under
    ~/.cache/tensorwasm, which is torn down on the way out."""
    reuse = os.environ.get("TENSORWASM_BENCH_CLUSTER_DIR")
    state_dir = Path(reuse) if reuse else default_state_dir().parent / own_dir
    plane = LocalControlPlane(state_dir, log=lambda m: None)
    state = plane.state() if reuse else plane.up(nodes=1, timeout_s=240)
    if state is None:
        raise RuntimeError(f"no running cluster in {state_dir}")
    try:
        yield plane, state, reuse
    finally:
        if not reuse:
            plane.down()
