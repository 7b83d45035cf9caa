"""Snapshot safety: kill -9 during capture never exposes a partial blob; damaged blobs are all refused.

The kill test forks writers from a pre-imported "zygote" process so each of the >= 100 kills costs a
fork, not an interpreter start (bounded for a 2-core CI).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorwasm.dev.procstat import parent_pid
from tensorwasm.runtime.errors import SnapshotRejected
from tensorwasm.runtime.snapshots import codec
from tensorwasm.runtime.snapshots.store import SnapshotStore

MODULE = "ef" * 32
UID = "tenant-under-fire"

# State of generation g, shared by the writer process and the checker (same code, same bytes).
STATE_SRC = """
import random
def state_for(g):
    rng = random.Random(g)
    memory = rng.randbytes(65536 * 4) + bytes(65536 * 4)
    gpu = {1: rng.randbytes(1 << 20), 2: bytes(1 << 19) + rng.randbytes(1 << 19), 7: bytes([g % 256]) * 1000}
    return memory, [("gen", "i64", g), ("x", "f64", g / 3)], gpu
"""

ZYGOTE_SRC = (
    STATE_SRC
    + """
import os, sys
from tensorwasm.runtime.snapshots.capture import write_snapshot
from tensorwasm.runtime.snapshots.store import SnapshotStore
root, uid, module = sys.argv[1:4]
print("ready", flush=True)
for line in sys.stdin:
    g = int(line)
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            store = SnapshotStore(root, retain=3)
            while os.getppid() == zygote:  # never outlive a failed test
                memory, globals_, gpu = state_for(g)
                write_snapshot(store, tenant_uid=uid, module_sha256=module, generation=g, memory=memory,
                               globals_=globals_, gpu=gpu, chunk_size=256 << 10)
                os.write(1, f"done {g}\\n".encode())
                store.gc()
                g += 1
        finally:
            os._exit(3)
    print(f"pid {pid}", flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
)

namespace: dict[str, object] = {}
exec(STATE_SRC, namespace)
state_for = namespace["state_for"]


def check_store(root: Path, committed: int) -> int:
    """Every visible blob verifies; the newest is at least the last committed one and decodes exactly."""
    directory = SnapshotStore(root).tenant_dir(UID)
    visible = sorted(directory.glob("*.twsnap")) if directory.exists() else []
    for path in visible:
        codec.verify_all(path.read_bytes())  # raises on any partial or corrupt blob
    latest = SnapshotStore(root).latest(UID)
    if committed < 0:
        return latest.manifest.generation if latest else -1
    assert latest is not None, "a committed snapshot disappeared"
    assert latest.manifest.generation >= committed
    blob = latest.path.read_bytes()
    m = latest.manifest
    memory, globals_, gpu = state_for(m.generation)  # type: ignore[operator]
    assert bytes(codec.decode_region(blob, m, m.region("wasm_memory"))) == memory
    assert codec.decode_globals(codec.decode_region(blob, m, m.region("globals"))) == globals_
    assert {r.handle: bytes(codec.decode_region(blob, m, r)) for r in codec.iter_gpu_regions(m)} == gpu
    return int(m.generation)


@pytest.mark.timeout(180)
def test_kill_9_during_capture_never_exposes_a_partial_snapshot(tmp_path: Path) -> None:
    env = {**os.environ, "TENSORWASM_RUNTIME_SNAPSHOT_THREADS": "2"}
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE_SRC, str(tmp_path), UID, MODULE],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert zygote.stdin is not None and zygote.stdout is not None
    rng = random.Random(1234)
    committed, kills, generation, temps = -1, 0, 0, 0
    try:
        assert zygote.stdout.readline().strip() == "ready"
        while kills < 120:
            zygote.stdin.write(f"{generation}\n")
            zygote.stdin.flush()
            # The writer may report a commit before the zygote prints its pid: both share the pipe.
            while (line := zygote.stdout.readline().strip()).startswith("done "):
                committed = max(committed, int(line.split()[1]))
            assert line.startswith("pid "), line
            pid = int(line.split()[1])
            if kills % 8 == 0:
                # Every eighth round waits for a commit before killing: on a machine too busy for
                # any write to finish within the random delay, the test still gets its commits.
                line = zygote.stdout.readline().strip()
                assert line.startswith("done "), line
                committed = max(committed, int(line.split()[1]))
            time.sleep(rng.uniform(0, 0.08))
            assert parent_pid(pid) == zygote.pid, f"refusing to kill {pid}: not the zygote's child"
            os.kill(pid, signal.SIGKILL)
            kills += 1
            while (line := zygote.stdout.readline().strip()) != "reaped":
                assert line.startswith("done "), line
                committed = max(committed, int(line.split()[1]))
            temps += (
                len(list(SnapshotStore(tmp_path).tenant_dir(UID).glob(".tmp-*"))) if committed >= 0 else 0
            )
            newest = check_store(tmp_path, committed)
            generation = max(generation, newest + 1)
    finally:
        zygote.kill()
        zygote.wait()
    assert kills >= 100
    assert committed >= 5, "the writer never got far enough for the test to mean anything"
    assert temps >= 20, f"only {temps} kills landed in the middle of a write"
    leftovers = list(SnapshotStore(tmp_path).tenant_dir(UID).glob(".tmp-*"))
    SnapshotStore(tmp_path).gc()
    assert not list(SnapshotStore(tmp_path).tenant_dir(UID).glob(".tmp-*")), leftovers


def _sample_blob() -> bytes:
    memory, globals_, gpu = state_for(3)  # type: ignore[operator]
    blob, _ = codec.encode_blob(
        tenant_uid=UID, module_sha256=MODULE, generation=3, memory=memory, globals_=globals_, gpu=gpu,
        chunk_size=128 << 10,
    )  # fmt: skip
    return blob


def test_every_random_byte_flip_is_refused() -> None:
    blob = _sample_blob()
    rng = random.Random(99)
    m_off = int.from_bytes(blob[16:24], "little")
    # Half the flips anywhere, half in the header + manifest where structure lives.
    positions = [rng.randrange(len(blob)) for _ in range(600)]
    positions += [rng.choice([rng.randrange(64), rng.randrange(m_off, len(blob))]) for _ in range(600)]
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= rng.randrange(1, 256)
        with pytest.raises(SnapshotRejected) as info:
            codec.verify_all(bytes(damaged))
        assert "snapshot" in info.value.message


def test_every_truncation_is_refused() -> None:
    blob = _sample_blob()
    rng = random.Random(7)
    for n in [0, 1, 63, 64, 65, len(blob) - 1] + [rng.randrange(len(blob)) for _ in range(1000)]:
        with pytest.raises(SnapshotRejected, match="truncated"):
            codec.verify_all(blob[:n])
