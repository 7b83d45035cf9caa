"""The real node's cgroups on a cgroup v2 host (the GPU machine): the node's cgroup and its `daemons`
child are made without copying a cpuset from the root, which has no cpuset.cpus there (an empty
cpuset inherits its parent's on v2). A fake v2 tree in a temp folder stands in for /sys/fs/cgroup:
the kernel creates the knob files on mkdir, so the test lays them out as the kernel would."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwasm.dev import node as real_node


def test_cgroups_on_v2_take_no_cpuset_from_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "cgroup.subtree_control").write_text("")
    net = real_node.NodeNetwork(7)
    for rel in (net.cgroup, f"{net.cgroup}/daemons"):  # as after mkdir on v2: empty cpuset knobs
        (root / rel).mkdir(parents=True)
        for knob in ("cpuset.cpus", "cpuset.mems", "cgroup.procs", "cgroup.subtree_control"):
            (root / rel / knob).write_text("")
    monkeypatch.setattr(real_node, "CGROUP_ROOT", root)

    procs = real_node.create_cgroups(net)

    assert procs == [root / net.cgroup / "daemons" / "cgroup.procs"]
    for rel in (net.cgroup, f"{net.cgroup}/daemons"):
        assert (root / rel / "cpuset.cpus").read_text() == ""  # left to inherit
    enabled = (root / net.cgroup / "cgroup.subtree_control").read_text().split()
    assert enabled == ["+cpuset", "+cpu", "+io", "+memory", "+hugetlb", "+pids"]


def test_a_cluster_directory_too_long_for_the_kubelets_sockets_is_refused_up_front() -> None:
    real_node.check_socket_room(real_node.NodePaths(Path("/root/.cache/tensorwasm/dev-cluster/node")))
    too_long = Path("/tmp/pytest-of-root/pytest-229/test_killed_node_daemons_come_0/cluster/node")
    with pytest.raises(real_node.NodeError, match="choose a shorter --dir"):
        real_node.check_socket_room(real_node.NodePaths(too_long))
