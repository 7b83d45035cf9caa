"""The starter's promises: a second `up` reuses, a partial cluster is refused, `down` leaves nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tensorwasm.dev.cluster import ClusterError, LocalControlPlane, pid_alive


def tensorwasm(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tensorwasm.cli.main", "dev", "cluster", *args, "--dir", str(state_dir)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_up_reuses_then_refuses_partial_then_down_leaves_nothing(tmp_path: Path, kube: object) -> None:
    # `kube` first: the binaries are built and cached before this second, private cluster starts.
    state_dir = tmp_path / "cluster"
    # The control plane's promises; the real node's are in test_real_node.py.
    up = tensorwasm("up", "--nodes", "1", "--no-real-node", state_dir=state_dir)
    assert up.returncode == 0, up.stderr
    assert up.stdout.strip() == f"export KUBECONFIG={state_dir / 'kubeconfig'}"

    plane = LocalControlPlane(state_dir, log=lambda _m: None)
    state = plane.state()
    assert state is not None and set(state.pids) == {
        "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok",
    }  # fmt: skip
    assert all(pid_alive(pid) for pid in state.pids.values())

    again = tensorwasm("up", "--no-real-node", state_dir=state_dir)
    assert again.returncode == 0 and "Reused running cluster" in again.stderr
    status = tensorwasm("status", state_dir=state_dir)
    assert status.returncode == 0 and "readyz" in status.stdout and "not ready" not in status.stdout

    os.kill(state.pids["kube-scheduler"], signal.SIGKILL)
    with pytest.raises(ClusterError, match="partly running cluster"):
        for _ in range(50):  # the kill is asynchronous; the refusal must come once it has landed
            plane.up(with_real_node=False)
    assert tensorwasm("status", state_dir=state_dir).returncode == 1

    down = tensorwasm("down", state_dir=state_dir)
    assert down.returncode == 0, down.stderr
    assert not state_dir.exists()
    assert not any(pid_alive(pid, f"{state.bin_dir}/{name}") for name, pid in state.pids.items())
    assert "nothing to stop" in tensorwasm("down", state_dir=state_dir).stderr
