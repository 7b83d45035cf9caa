"""The host-side GPU byte reservation: exact limits, granularity, structured errors, thread safety."""

from __future__ import annotations

import random
import threading

import pytest

from tensorwasm.runtime.errors import BadRequest, GpuMemoryExhausted
from tensorwasm.runtime.tenancy.gpucap import GpuCap

MiB = 1 << 20


def test_charges_round_up_to_the_granularity() -> None:
    cap = GpuCap(8 * MiB, 2 * MiB)
    assert cap.reserve(1) == 2 * MiB
    assert cap.reserve(2 * MiB) == 2 * MiB
    assert cap.reserve(2 * MiB + 1) == 4 * MiB
    assert cap.current == 8 * MiB


def test_exact_limit_is_allowed_and_one_more_is_refused_with_details() -> None:
    cap = GpuCap(4 * MiB, MiB)
    cap.reserve(4 * MiB)
    with pytest.raises(GpuMemoryExhausted) as info:
        cap.reserve(1)
    err = info.value
    assert (err.requested, err.limit, err.current) == (MiB, 4 * MiB, 4 * MiB)
    assert err.to_json()["error"] == {
        "kind": "gpu_memory_exhausted",
        "message": err.message,
        "requested": MiB,
        "limit": 4 * MiB,
        "current": 4 * MiB,
    }
    assert cap.current == 4 * MiB  # a refusal changes nothing
    cap.release(MiB)
    assert cap.reserve(1) == MiB


def test_no_limit_counts_without_refusing() -> None:
    cap = GpuCap(None, 2 * MiB)
    for _ in range(1000):
        cap.reserve(1 << 30)
    assert cap.current == 1000 << 30 and cap.limit is None


def test_zero_cap_refuses_everything() -> None:
    with pytest.raises(GpuMemoryExhausted):
        GpuCap(0, 1).reserve(1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", None, True])
def test_bad_sizes_are_refused(bad: object) -> None:
    with pytest.raises(BadRequest):
        GpuCap(MiB).reserve(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("limit", "gran"), [(-1, 1), (1.0, 1), (MiB, 0), (MiB, -2), (MiB, 2.0)])
def test_bad_configuration_is_refused(limit: object, gran: object) -> None:
    with pytest.raises(BadRequest):
        GpuCap(limit, gran)  # type: ignore[arg-type]


def test_release_more_than_reserved_is_a_bug_not_clamped() -> None:
    cap = GpuCap(MiB, 1)
    cap.reserve(10)
    with pytest.raises(BadRequest):
        cap.release(11)
    with pytest.raises(BadRequest):
        cap.release(-1)
    assert cap.current == 10


def test_reserve_all_is_all_or_nothing() -> None:
    cap = GpuCap(10 * MiB, MiB)
    cap.reserve(3 * MiB)
    with pytest.raises(GpuMemoryExhausted) as info:
        cap.reserve_all([4 * MiB, 3 * MiB + 1])
    assert info.value.requested == 8 * MiB and cap.current == 3 * MiB
    assert cap.reserve_all([4 * MiB, 3 * MiB]) == [4 * MiB, 3 * MiB]
    assert cap.current == 10 * MiB


def test_threads_hammering_never_pass_the_cap_and_return_to_zero() -> None:
    limit, gran = 64 * MiB, 2 * MiB
    cap = GpuCap(limit, gran)
    refused = [0] * 16
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[int] = []
        try:
            start.wait()
            for _ in range(20_000):
                if held and rng.random() < 0.5:
                    cap.release(held.pop(rng.randrange(len(held))))
                else:
                    try:
                        held.append(cap.reserve(rng.randint(1, 6 * MiB)))
                    except GpuMemoryExhausted as exc:
                        assert exc.current + exc.requested > exc.limit
                        refused[seed] += 1
                assert cap.current <= limit
            for charged in held:
                cap.release(charged)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert cap.peak <= limit
    assert sum(refused) > 0  # the cap was actually contended
    assert cap.current == 0
