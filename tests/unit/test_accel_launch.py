"""Tenant PTX signatures: parsed from the .entry parameter list, refused clearly when unusable."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorwasm.runtime.accel.base import KernelArg
from tensorwasm.runtime.accel.launch import LaunchLimits, signature_from_ptx, validate_launch
from tensorwasm.runtime.errors import InvalidKernelLaunch, ModuleRejected

PTX = (Path(__file__).parents[1] / "gpu" / "saxpy_tenant.ptx").read_text()


def test_signature_comes_from_the_entry_params() -> None:
    sig = signature_from_ptx("axpy_tenant", PTX)
    assert sig.params == ("f32", "b64", "b64", "b32") and sig.extents is None
    assert signature_from_ptx("noargs", ".visible .entry noargs(\n)\n{ ret; }").params == ()


def test_b64_params_take_handles_or_raw_integers_and_b32_takes_both_signs() -> None:
    sig = signature_from_ptx("axpy_tenant", PTX)
    buffers = {1: (None, 64, 64)}
    values = validate_launch(
        sig, (1, 1, 1), (1, 1, 1),
        [KernelArg("f32", 1), KernelArg("buffer", 1), KernelArg("u64", 2**64 - 1), KernelArg("i32", -5)],
        0, LaunchLimits(), buffers,
    )  # fmt: skip
    assert values == [1.0, 1, 2**64 - 1, -5]
    with pytest.raises(InvalidKernelLaunch):
        validate_launch(
            sig, (1, 1, 1), (1, 1, 1),
            [KernelArg("f64", 1.0), KernelArg("buffer", 1), KernelArg("buffer", 1), KernelArg("u32", 1)],
            0, LaunchLimits(), buffers,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("kernel", "ptx", "match"),
    [
        ("axpy_tenant", "", "empty"),
        ("other", PTX, "no .entry named"),
        ("k", ".entry k(\n .param .align 8 .b8 k_param_0[16]\n)\n{ ret; }", "unsupported type"),
        ("k", ".entry k(\n .param .u16 k_param_0\n)\n{ ret; }", "unsupported type"),
        ("k", ".entry k(\n garbage\n)\n{ ret; }", "unsupported type"),
        ("k", "x" * (9 << 20), "over"),
    ],
)
def test_unusable_ptx_is_rejected(kernel: str, ptx: str, match: str) -> None:
    with pytest.raises(ModuleRejected, match=match):
        signature_from_ptx(kernel, ptx)
