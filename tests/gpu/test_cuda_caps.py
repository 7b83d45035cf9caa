"""Layer 1 (host counter) and layer 2 (driver pool maxSize) of the GPU cap, on a real device."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest

from tensorwasm.runtime import metrics
from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted, TenantNotReady

MiB = 1 << 20


def _refusals(tenant: str, layer: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "tensorwasm_gpu_alloc_refused_total", {"tenant": tenant, "layer": layer}
    )
    return value or 0.0


def test_driver_refuses_over_cap_with_host_counter_bypassed(cuda_acc: Any) -> None:
    from cuda.bindings import driver as cu

    dev = cuda_acc.open_tenant("bypass", 64 * MiB)
    try:
        oom = cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY
        err, _ = cu.cuMemAllocFromPoolAsync(65 * MiB, dev.pool, dev.stream)
        print("driver, 65 MiB into a 64 MiB pool:", err.name)
        assert err == oom
        held = []
        for i in range(4):
            err, ptr = cu.cuMemAllocFromPoolAsync(16 * MiB, dev.pool, dev.stream)
            assert not err, (i, err)
            held.append(ptr)
        err, _ = cu.cuMemAllocFromPoolAsync(16 * MiB, dev.pool, dev.stream)
        print("driver, fifth 16 MiB into a 64 MiB pool:", err.name)
        assert err == oom
        reserved, used = dev.pool_usage()
        print(f"driver pool reserved={reserved} used={used}")
        assert used == 64 * MiB and reserved <= 64 * MiB
        assert dev.bytes_in_use() == 0  # the host counter never saw these: it was bypassed
        for ptr in held:
            assert not cu.cuMemFreeAsync(ptr, dev.stream)[0]
        assert not cu.cuStreamSynchronize(dev.stream)[0]
    finally:
        cuda_acc.close_tenant("bypass")


def test_host_counter_refuses_first_with_structured_error(cuda_acc: Any) -> None:
    dev = cuda_acc.open_tenant("capped", 64 * MiB)
    try:
        before_host, before_driver = _refusals("capped", "host"), _refusals("capped", "driver")
        handles = [dev.alloc(16 * MiB) for _ in range(4)]
        with pytest.raises(GpuMemoryExhausted) as info:
            dev.alloc(16 * MiB)
        err = info.value
        print("host counter:", err.to_json())
        assert (err.requested, err.limit, err.current) == (16 * MiB, 64 * MiB, 64 * MiB)
        with pytest.raises(GpuMemoryExhausted):
            dev.alloc(65 * MiB)
        assert _refusals("capped", "host") == before_host + 2
        assert _refusals("capped", "driver") == before_driver
        assert dev.pool_usage()[1] == 64 * MiB
        for h in handles:
            dev.free(h)
        dev.sync()
        assert dev.bytes_in_use() == 0 and dev.pool_usage()[1] == 0
        small = dev.alloc(1)  # charged at the pool's granularity
        assert dev.bytes_in_use() == cuda_acc.granularity
        dev.free(small)
    finally:
        cuda_acc.close_tenant("capped")


def test_granularity_matches_the_driver(cuda_acc: Any) -> None:
    """The host counter never counts less than the pool's used bytes, whatever the sizes."""
    dev = cuda_acc.open_tenant("gran", 256 * MiB)
    try:
        seen = []
        for size in (1, 4097, MiB, MiB + 1, 2 * MiB, 2 * MiB + 1, 3 * MiB + 7):
            h = dev.alloc(size)
            dev.sync()
            seen.append((size, dev.bytes_in_use(), dev.pool_usage()[1]))
            dev.free(h)
            dev.sync()
        print("size, host-counted, driver used:", seen)
        assert all(host >= used for _, host, used in seen)
    finally:
        cuda_acc.close_tenant("gran")


def test_stress_caps_hold_and_return_to_zero(cuda_acc: Any) -> None:
    """16 threads x N random alloc/free over 4 tenants; the driver is sampled throughout."""
    ops = int(os.environ.get("TW_STRESS_OPS", "100000"))
    caps = {"s0": 16 * MiB, "s1": 32 * MiB, "s2": 48 * MiB, "s3": 64 * MiB}
    devs = {t: cuda_acc.open_tenant(t, cap) for t, cap in caps.items()}
    peaks = {t: [0, 0] for t in caps}  # sampled (reserved, used)
    samples = [0]
    stop = threading.Event()
    errors: list[BaseException] = []
    refused = [0] * 16

    def sampler() -> None:
        while not stop.is_set():
            for t, d in devs.items():
                reserved, used = d.pool_usage()
                peaks[t][0] = max(peaks[t][0], reserved)
                peaks[t][1] = max(peaks[t][1], used)
            samples[0] += 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        names = list(devs)
        held: list[tuple[str, int]] = []
        try:
            for _ in range(ops):
                if held and (rng.random() < 0.5 or len(held) > 24):
                    t, h = held.pop(rng.randrange(len(held)))
                    devs[t].free(h)
                else:
                    t = rng.choice(names)
                    try:
                        held.append((t, devs[t].alloc(rng.randint(1, 6 * MiB))))
                    except GpuMemoryExhausted:
                        refused[seed] += 1
            for t, h in held:
                devs[t].free(h)
        except BaseException as exc:
            errors.append(exc)

    before = {t: (_refusals(t, "host"), _refusals(t, "driver")) for t in caps}
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - started
    stop.set()
    watcher.join()
    try:
        assert not errors, errors[:3]
        for t, d in devs.items():
            d.sync()
            _, used = d.pool_usage()
            print(
                f"{t}: cap={caps[t]} host_peak={d.cap.peak} driver_peak_reserved={peaks[t][0]} "
                f"driver_peak_used={peaks[t][1]} end_used={used} end_host={d.bytes_in_use()}"
            )
            from cuda.bindings import driver as cu

            _, high = cu.cuMemPoolGetAttribute(
                d.pool, cu.CUmemPool_attribute.CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH
            )
            print(f"{t}: driver reserved high-water mark {int(high)}")
            # Bytes in use, as the host counts them and as the driver reports them, never pass the cap.
            assert d.cap.peak <= caps[t] and peaks[t][1] <= caps[t]
            assert used == 0 and d.bytes_in_use() == 0 and d.buffers() == {}
        host = sum(_refusals(t, "host") - before[t][0] for t in caps)
        driver = sum(_refusals(t, "driver") - before[t][1] for t in caps)
        print(
            f"{16 * ops} ops in {elapsed:.1f}s, {sum(refused)} refused (host counter {host:.0f}, "
            f"driver after trim+retry {driver:.0f}), {samples[0]} driver samples"
        )
        assert host > 0 and host + driver == sum(refused)  # the caps were reached, every refusal counted
    finally:
        for t in caps:
            cuda_acc.close_tenant(t)


def test_close_tenant_frees_buffers_and_pool(cuda_acc: Any) -> None:
    free_before = cuda_acc.memory_info()[0]
    dev = cuda_acc.open_tenant("closing", 512 * MiB)
    handles = [dev.alloc(100 * MiB) for _ in range(4)]
    assert cuda_acc.memory_info()[0] < free_before - 300 * MiB
    cuda_acc.close_tenant("closing")
    assert dev.bytes_in_use() == 0
    with pytest.raises(TenantNotReady):
        dev.alloc(1)
    with pytest.raises(TenantNotReady):
        dev.free(handles[0])
    assert cuda_acc.memory_info()[0] > free_before - 64 * MiB
    again = cuda_acc.open_tenant("closing", 512 * MiB)  # the id is free again
    assert again.bytes_in_use() == 0
    cuda_acc.close_tenant("closing")


def test_accounting_only_tenant_counts_without_refusing(cuda_acc: Any) -> None:
    dev = cuda_acc.open_tenant("uncapped", None)
    try:
        h = dev.alloc(300 * MiB)
        assert dev.bytes_in_use() >= 300 * MiB
        dev.free(h)
        assert dev.bytes_in_use() == 0
        with pytest.raises(BadRequest):
            dev.free(h)
    finally:
        cuda_acc.close_tenant("uncapped")
