"""GPU test fixtures: a real CUDA accelerator, or a clean skip saying why there is none.

Skips every test in this folder when cuda.bindings is missing or the driver sees no device, so the
folder is safe to collect on CI (which has no GPU).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


def _why_no_gpu() -> str | None:
    try:
        from cuda.bindings import driver as cu
    except ImportError as exc:
        return f"cuda.bindings is not installed ({exc})"
    try:
        (err,) = cu.cuInit(0)
        if err:
            return f"cuInit failed: {err.name}"
        err, count = cu.cuDeviceGetCount()
    except Exception as exc:  # no driver library at all
        return f"no CUDA driver: {type(exc).__name__}: {exc}"
    return None if not err and count > 0 else "no CUDA device visible"


NO_GPU = _why_no_gpu()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.gpu)
            if NO_GPU:
                item.add_marker(pytest.mark.skip(reason=f"needs an NVIDIA GPU: {NO_GPU}"))


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="session")
def cuda_acc(kernel_cache: Path) -> Iterator[object]:
    from tensorwasm.runtime.accel.cuda import CudaAccelerator

    with pytest.MonkeyPatch.context() as patch:
        if os.environ.get(HIDE_NVRTC):
            # As in an image on a GPU node: the NVIDIA runtime mounts the driver, never NVRTC.
            patch.setattr(cuda_nvrtc(), "nvrtcVersion", _no_nvrtc)
        acc = CudaAccelerator(0, cache_dir=kernel_cache)
        yield acc
        acc.close()


HIDE_NVRTC = "TENSORWASM_TEST_HIDE_NVRTC"


def cuda_nvrtc() -> object:
    from tensorwasm.runtime.accel import cuda

    return cuda.nvrtc


def _no_nvrtc() -> object:
    raise OSError("libnvrtc.so.13: cannot open shared object file (hidden by the test)")
