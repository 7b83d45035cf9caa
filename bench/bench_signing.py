"""Signed snapshots: what signing costs capture and restore, beside unsigned blobs and the hash floor.

For random float32 state (stored raw: every byte is hashed, the worst case) of each size, on the
real engine and the best accelerator here, in one run:
- capture: capture_snapshot() into the store, fsync included, unsigned vs signed (SHA-256 per chunk
  on the worker threads beside the CRC-32, HMAC-SHA256 over header + manifest);
- restore: restore_snapshot() from the file (no hot tier: the path that verifies), unsigned (CRC-32
  per chunk) vs signed in mode require (SHA-256 per chunk, the MAC checked first);
- floor: CRC-32 and SHA-256 over the same bytes in 4 MiB pieces on the same worker threads, GB/s:
  signing cannot cost less than hashing every stored byte once at the SHA-256 rate.
Sizes: TENSORWASM_BENCH_SIGNING_SIZES (MiB, default 16,128).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_snapshot import MODULE_WAT, UID, _Case, _p50, piece_rates


def _hash_rates(data: np.ndarray) -> dict[str, float]:
    """GB/s of CRC-32 and SHA-256 over `data` in 4 MiB pieces on the worker threads (best of 3)."""
    return piece_rates(data, {"crc32": zlib.crc32, "sha256": lambda b: hashlib.sha256(b).digest()}, digits=2)


def run() -> dict[str, Any]:
    from tensorwasm.runtime.accel import select_accelerator
    from tensorwasm.runtime.engine import Engine
    from tensorwasm.runtime.snapshots import signing
    from tensorwasm.runtime.snapshots.capture import capture_snapshot
    from tensorwasm.runtime.snapshots.restore import restore_snapshot
    from tensorwasm.runtime.snapshots.store import SnapshotStore

    sizes = [int(s) for s in os.environ.get("TENSORWASM_BENCH_SIGNING_SIZES", "16,128").split(",")]
    acc = select_accelerator(os.environ.get("TENSORWASM_BENCH_ACCELERATOR", "auto"))
    work = Path(tempfile.mkdtemp(prefix="tw-bench-signing-"))
    engine = Engine(cache_dir=work / "cache")
    module = engine.compile(MODULE_WAT, hashlib.sha256(MODULE_WAT).hexdigest())
    store = SnapshotStore(work / "store", retain=4)
    ring = signing.KeyRing({"bench": hashlib.sha256(b"bench key").digest()}, "bench")
    policies = {
        "unsigned": signing.SigningPolicy("off"),
        "signed": signing.SigningPolicy("require", ring=ring),
    }
    figures: dict[str, float] = {}
    rows = []
    rates: dict[str, float] = {}
    try:
        for size in sizes:
            case = _Case(acc, engine, module, "weights", size, f"sign-{size}")
            reps = 9 if size <= 16 else 5
            result: dict[str, dict[str, float]] = {}
            for label, policy in policies.items():

                def capture(case: _Case = case, policy: Any = policy) -> Any:
                    return capture_snapshot(
                        store, tenant_uid=UID, module_sha256=module.sha256, generation=1, pool=case.src,
                        device=case.src_dev, accelerator=acc, signing_policy=policy,
                    )  # fmt: skip

                capture_ms, caps = _p50(capture, reps)
                path = caps[-1].path

                def restore(case: _Case = case, path: Path = path, policy: Any = policy) -> Any:
                    return restore_snapshot(
                        path, tenant_uid=UID, module_sha256=module.sha256, pool=case.dst, device=case.dst_dev,
                        accelerator=acc, signing_policy=policy,
                    )  # fmt: skip

                restore_ms, restored = _p50(restore, reps, warm=2)
                assert all(r.source == "file" for r in restored), "the bench must restore from the file"
                assert ("verified" in restored[-1].signature) == (label == "signed")
                case.check()
                result[label] = {"capture": capture_ms, "restore": restore_ms}
                store.gc()
            if size == max(sizes):
                rates = _hash_rates(np.concatenate(list(case.gpu.values())))
            u, s = result["unsigned"], result["signed"]
            for what in ("capture", "restore"):
                figures[f"{what}_p50_ms_unsigned_{size}MiB"] = round(u[what], 2)
                figures[f"{what}_p50_ms_signed_{size}MiB"] = round(s[what], 2)
                figures[f"{what}_signed_over_unsigned_{size}MiB"] = round(s[what] / u[what], 2)
            rows.append(
                f"| {size} | {u['capture']:.1f} | {s['capture']:.1f} | {s['capture'] / u['capture']:.2f}x "
                f"| {u['restore']:.1f} | {s['restore']:.1f} | {s['restore'] / u['restore']:.2f}x |"
            )
            case.close(acc)
        for name, rate in rates.items():
            figures[f"{name}_gb_s_worker_threads"] = rate
    finally:
        engine.close()
        acc.close()
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        "| MiB | capture unsigned ms | capture signed ms | signed/unsigned | restore unsigned ms "
        "| restore signed ms | signed/unsigned |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    return {
        "title": "Signed snapshots: capture and restore, signed vs unsigned, and the hash floor",
        "figures": figures,
        "table": table,
        "notes": (
            f"Accelerator: {acc.name}. Random float32 state (stored raw, so every byte is hashed): wasm "
            "memory 1 MiB, the rest in 4 GPU buffers. P50 of 9 (16 MiB) or 5 runs in one process: "
            "unsigned first, then signed, per size. Restore from the file with no hot tier (the "
            "path that verifies), page cache warm. Signed = mode require: the HMAC-SHA256 over header + "
            "manifest, then SHA-256 instead of CRC-32 per chunk on the worker threads. The floor rows are "
            "CRC-32 and SHA-256 over the largest case's GPU bytes in 4 MiB pieces on the same threads."
        ),
    }
