"""Probe (not a test): does a pool's RESERVED_MEM_CURRENT stay under maxSize under churn?

Single thread, one 16 MiB-cap tenant, random 1..6 MiB alloc/free through TenantDevice, the driver read
after every operation; then the same churn on a raw pool (no host counter, no trim-and-retry).
Usage: python tests/gpu/probe_pool_reserve.py  (prints one JSON line)
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from cuda.bindings import driver as cu

from tensorwasm.runtime.accel.cuda import CudaAccelerator
from tensorwasm.runtime.errors import GpuMemoryExhausted

MiB = 1 << 20
CAP = 16 * MiB
A = cu.CUmemPool_attribute


def _attr(pool: object, which: object) -> int:
    return int(cu.cuMemPoolGetAttribute(pool, which)[1])


def main() -> None:
    acc = CudaAccelerator(0, cache_dir=Path(tempfile.mkdtemp()))
    acc.bind_thread()
    dev = acc.open_tenant("probe", CAP)
    rng = random.Random(1)
    held: list[int] = []
    over = []
    refusals = 0
    for i in range(20000):
        if held and rng.random() < 0.5:
            dev.free(held.pop(rng.randrange(len(held))))
            op = "free"
        else:
            try:
                held.append(dev.alloc(rng.randint(1, 6 * MiB)))
                op = "alloc"
            except GpuMemoryExhausted:
                refusals += 1
                op = "refused"
        reserved = _attr(dev.pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        if reserved > CAP and len(over) < 5:
            over.append({"op": i, "kind": op, "reserved": reserved, "live": sorted(dev.buffers().values())})
    tenant = {
        "reserved_high": _attr(dev.pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH),
        "used_high": _attr(dev.pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH),
        "refusals": refusals,
        "first_over_cap": over,
    }
    for h in held:
        dev.free(h)
    acc.close_tenant("probe")

    props = cu.CUmemPoolProps()
    props.allocType = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    props.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    props.location.id = 0
    props.maxSize = CAP
    _, pool = cu.cuMemPoolCreate(props)
    cu.cuMemPoolSetAttribute(pool, A.CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, cu.cuuint64_t(CAP))
    _, stream = cu.cuStreamCreate(1)
    raw_held = []
    ooms = 0
    for _ in range(20000):
        if raw_held and rng.random() < 0.5:
            cu.cuMemFreeAsync(raw_held.pop(rng.randrange(len(raw_held))), stream)
        else:
            size = -(-rng.randint(1, 6 * MiB) // (2 * MiB)) * 2 * MiB
            err, p = cu.cuMemAllocFromPoolAsync(size, pool, stream)
            if err:
                ooms += 1
            else:
                raw_held.append(p)
    raw = {
        "reserved_high": _attr(pool, A.CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH),
        "used_high": _attr(pool, A.CU_MEMPOOL_ATTR_USED_MEM_HIGH),
        "ooms": ooms,
    }
    for p in raw_held:
        cu.cuMemFreeAsync(p, stream)
    cu.cuStreamSynchronize(stream)
    cu.cuMemPoolDestroy(pool)
    acc.close()
    print(json.dumps({"cap": CAP, "tenant_pool": tenant, "raw_pool": raw}))


if __name__ == "__main__":
    main()
