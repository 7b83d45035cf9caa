"""Layer 3: under MPS a shard process cannot allocate past its pinned device memory limit, even while
another client holds memory. Starts its own control daemon in a temporary pipe directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tensorwasm.runtime.accel import mps

MiB = 1 << 20
CHILD = r"""
import sys
from pathlib import Path
from tensorwasm.runtime.accel.cuda import CudaAccelerator
from tensorwasm.runtime.accel import mps
from tensorwasm.runtime.errors import GpuMemoryExhausted
acc = CudaAccelerator(0, cache_dir=Path(sys.argv[1]))
dev = acc.open_tenant("shard-tenant", None)
print("mode", mps.current_mode(), acc.health().mps, flush=True)
print("memory_info", acc.memory_info(), file=sys.stderr, flush=True)
for size in [int(s) for s in sys.argv[2].split(",")]:
    try:
        dev.alloc(size << 20)
        print("alloc", size, "ok", dev.bytes_in_use(), flush=True)
    except GpuMemoryExhausted as exc:
        print("alloc", size, "refused", exc.to_json(), flush=True)
if len(sys.argv) > 3:
    print("READY", flush=True)
    sys.stdin.readline()
"""


def test_second_client_cannot_pass_its_pinned_limit(tmp_path: Path, kernel_cache: Path) -> None:
    if mps.find_control_binary() is None:
        pytest.skip("nvidia-cuda-mps-control is not installed")
    daemon = mps.MpsDaemon(tmp_path / "pipe", tmp_path / "log")
    daemon.start()
    holder = None
    try:
        env = {
            **__import__("os").environ,
            **mps.build_client_env(tmp_path / "pipe", 50, 2048 * MiB, log_dir=tmp_path / "log"),
        }
        print("client env:", {k: v for k, v in env.items() if k.startswith("CUDA_MPS")})
        holder = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(kernel_cache), "1024", "hold"],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert holder.stdout is not None
        lines = []
        while (line := holder.stdout.readline()) and not line.startswith("READY"):
            lines.append(line.strip())
        print("first client:", lines)
        assert any("alloc 1024 ok" in line for line in lines)
        second = subprocess.run(
            [sys.executable, "-c", CHILD, str(kernel_cache), "1024,1536,4096"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        print("second client:", second.stdout, second.stderr[-2000:])
        assert second.returncode == 0
        out = second.stdout.splitlines()
        assert out[0] == "mode client client"
        assert "alloc 1024 ok" in out[1]
        assert "refused" in out[2] and "refused" in out[3]  # 1024 + 1536 > 2048 MiB pinned limit
        print("server list:", daemon.command("get_server_list").strip())
    finally:
        if holder is not None:
            holder.communicate("\n", timeout=60)
        daemon.stop()
