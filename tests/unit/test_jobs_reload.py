"""Review R3 K4: the job board's 1 s tick drops the tables of tenants that left the shard, and only
those: a module change unloads the old version and serves nothing while the new one opens, and the
tenant's finished jobs stay readable across it. A real shard and HTTP; the new module's open is held
until a whole board tick has run after the unload, so the window is always crossed."""

from __future__ import annotations

import shutil
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tensorwasm.runtime.api.jobs import JobBoard
from tensorwasm.runtime.tenancy.config import ModuleSource
from tests.conftest import wait_for
from tests.runtime_fixtures import sha256_of, start_runtime_server, tenant


def test_a_module_change_keeps_the_tenants_finished_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ticks = [0]
    real_tick = JobBoard.tick

    def counted(self: JobBoard) -> None:
        real_tick(self)
        ticks[0] += 1

    monkeypatch.setattr(JobBoard, "tick", counted)
    alpha = tenant("alpha", "echo.wat", ["echo"])
    running = start_runtime_server([alpha])
    server = next(running)
    try:
        r = server.request("POST", "/v1/functions/echo/invoke?mode=async", b"hello", token=alpha.token)
        assert r.status == 202, r.body
        job = r.json()["id"]
        done = f"/v1/jobs/{job}"
        wait_for(
            lambda: server.request("GET", done, token=alpha.token).json().get("state") == "succeeded",
            30,
            "job",
        )
        new = tmp_path / "echo2.wat"  # the same exports, another digest: a module change
        assert alpha.module.path is not None
        shutil.copy(Path(alpha.module.path), new)
        new.write_text(new.read_text() + "\n;; v2\n")
        alpha2 = replace(alpha, module=ModuleSource(sha256=sha256_of(new), path=new))
        shard = server.shard
        real_open = shard._open
        crossed = threading.Event()

        def held_open(*args: Any, **kwargs: Any) -> Any:
            if crossed.is_set():  # only the reload's open is held
                return real_open(*args, **kwargs)
            assert "alpha" not in shard.served  # the old version is unloaded: the window is open
            seen = ticks[0]
            wait_for(lambda: ticks[0] > seen, 30, "a board tick while alpha is not served")
            crossed.set()
            return real_open(*args, **kwargs)

        monkeypatch.setattr(shard, "_open", held_open)
        server.sync([alpha2])
        wait_for(lambda: (t := shard.served.get("alpha")) is not None and t.config == alpha2, 60, "reloaded")
        assert crossed.is_set()
        got = server.request("GET", done, token=alpha.token)
        assert got.status == 200 and got.json()["state"] == "succeeded", got.body[:200]
        # A tenant that leaves the shard does lose its table (at the next tick).
        server.sync([])
        wait_for(lambda: server.shard.by_auth == {} and ticks[0] > 0, 30, "alpha gone")
        seen = ticks[0]
        wait_for(lambda: ticks[0] > seen, 30, "a tick after alpha left")
        server.sync([alpha2])
        wait_for(lambda: "alpha" in shard.served, 60, "alpha back")
        assert server.request("GET", done, token=alpha.token).status == 404
    finally:
        for _ in running:
            pass
