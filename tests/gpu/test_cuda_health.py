"""Sticky CUDA errors poison the context: health() goes not-ok with the reason, every call refuses.
Runs in a child process, since a poisoned primary context cannot be used again by this one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
CHILD = r"""
import json, sys
from pathlib import Path
from tensorwasm.runtime.accel import select_accelerator
from tensorwasm.runtime.accel.base import KernelArg
from tensorwasm.runtime.errors import AcceleratorFailed
acc = select_accelerator("cuda", cache_dir=Path(sys.argv[2]))
dev = acc.open_tenant("evil", 1 << 20, {"poke": Path(sys.argv[1]).read_text()})
before = acc.health()
dev.launch("poke", (1, 1, 1), (1, 1, 1), [KernelArg("u64", 16)])
out = {"before": before.ok}
try:
    dev.sync()
    out["sync"] = "ok"
except AcceleratorFailed as exc:
    out["sync"] = exc.to_json()
try:
    dev.alloc(1)
    out["alloc"] = "ok"
except AcceleratorFailed as exc:
    out["alloc"] = exc.kind
h = acc.health()
out["health"] = {"ok": h.ok, "reason": h.reason}
print(json.dumps(out))
"""


def test_illegal_address_poisons_and_fails_health(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(HERE / "poison_tenant.ptx"), str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(out)
    assert out["before"] is True
    assert out["sync"]["error"]["kind"] == "accelerator_failed"
    assert "ILLEGAL_ADDRESS" in out["sync"]["error"]["message"]
    assert out["alloc"] == "accelerator_failed"
    assert out["health"]["ok"] is False and "poisoned" in out["health"]["reason"]


def test_healthy_accelerator_reports_ok(cuda_acc: object) -> None:
    health = cuda_acc.health()  # type: ignore[attr-defined]
    assert health.ok and health.reason == ""
