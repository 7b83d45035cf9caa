"""MPS: the client environment a shard runs under, and a control daemon for `--mps-start`.

Owns the translation of a shard's capacity (SM share, GPU memory slice) into
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE / CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, applying it before the driver
initialises, starting/stopping `nvidia-cuda-mps-control -d`, and the "off|client|daemon" state shown
in /readyz and metrics. Must not import cuda, pynvml or wasmtime (MPS is configured from outside).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from tensorwasm.runtime.errors import AcceleratorFailed, BadRequest

log = logging.getLogger(__name__)

PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
THREADS_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
PINNED_ENV = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
_CONTROL = "nvidia-cuda-mps-control"
_FALLBACK_BINARIES = ("/usr/local/nvidia/bin/nvidia-cuda-mps-control", "/usr/bin/nvidia-cuda-mps-control")

_daemon: MpsDaemon | None = None


def build_client_env(
    pipe_dir: str | Path,
    active_thread_percentage: int | None = None,
    pinned_mem_limit_bytes: int | None = None,
    device: int = 0,
    log_dir: str | Path | None = None,
) -> dict[str, str]:
    """Environment that makes this process an MPS client with a fixed slice of one device."""
    if not str(pipe_dir):
        raise BadRequest("MPS pipe directory must not be empty")
    env = {PIPE_ENV: str(pipe_dir)}
    if log_dir is not None:
        env[LOG_ENV] = str(log_dir)
    if active_thread_percentage is not None:
        if type(active_thread_percentage) is not int or not 1 <= active_thread_percentage <= 100:
            raise BadRequest(f"MPS active thread percentage must be 1..100, got {active_thread_percentage!r}")
        env[THREADS_ENV] = str(active_thread_percentage)
    if pinned_mem_limit_bytes is not None:
        if type(pinned_mem_limit_bytes) is not int or pinned_mem_limit_bytes < (1 << 20):
            raise BadRequest(
                f"MPS pinned memory limit must be at least 1 MiB, got {pinned_mem_limit_bytes!r}"
            )
        if type(device) is not int or device < 0:
            raise BadRequest(f"device ordinal must be a non-negative integer, got {device!r}")
        # MPS takes whole MiB; rounding down never grants more than the shard's slice.
        env[PINNED_ENV] = f"{device}={pinned_mem_limit_bytes >> 20}M"
    return env


def apply_client_env(env: dict[str, str]) -> None:
    """Install the client environment; must run before the CUDA driver is initialised in this process."""
    os.environ.update(env)
    log.info("Configured MPS client %s", " ".join(f"{k}={v}" for k, v in sorted(env.items())))


def current_mode() -> str:
    """ "daemon" when this process started the control daemon, "client" under a pipe dir, else "off"."""
    if _daemon is not None and _daemon.running:
        return "daemon"
    return "client" if os.environ.get(PIPE_ENV) else "off"


def find_control_binary() -> str | None:
    found = shutil.which(_CONTROL)
    if found:
        return found
    return next((p for p in _FALLBACK_BINARIES if os.access(p, os.X_OK)), None)


class MpsDaemon:
    """An MPS control daemon this process started (development and benchmarks), stopped by `stop()`."""

    def __init__(
        self, pipe_dir: str | Path, log_dir: str | Path | None = None, binary: str | None = None
    ) -> None:
        self.pipe_dir = Path(pipe_dir)
        self.log_dir = Path(log_dir) if log_dir is not None else self.pipe_dir / "log"
        self.binary = binary or find_control_binary()
        self.running = False

    def _env(self) -> dict[str, str]:
        return {**os.environ, PIPE_ENV: str(self.pipe_dir), LOG_ENV: str(self.log_dir)}

    def start(self, timeout_s: float = 10.0) -> None:
        global _daemon
        if self.binary is None:
            raise AcceleratorFailed(f"--mps-start needs {_CONTROL}, which is not on PATH")
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [self.binary, "-d"], env=self._env(), capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise AcceleratorFailed(f"{_CONTROL} -d failed ({done.returncode}): {done.stderr.strip()}")
        deadline = time.monotonic() + timeout_s
        while not (self.pipe_dir / "control").exists():
            if time.monotonic() > deadline:
                raise AcceleratorFailed(f"MPS control pipe did not appear in {self.pipe_dir}")
            time.sleep(0.02)
        self.running = True
        _daemon = self
        log.info("Started MPS control daemon pipe_dir=%s", self.pipe_dir)

    def command(self, text: str) -> str:
        """Send one command to the control daemon (e.g. "get_server_list")."""
        if self.binary is None:
            raise AcceleratorFailed(f"{_CONTROL} is not on PATH")
        done = subprocess.run(
            [self.binary], input=text + "\n", env=self._env(), capture_output=True, text=True, timeout=30
        )
        return done.stdout

    def stop(self) -> None:
        global _daemon
        if not self.running:
            return
        self.command("quit")
        self.running = False
        if _daemon is self:
            _daemon = None
        log.info("Stopped MPS control daemon pipe_dir=%s", self.pipe_dir)

    def __enter__(self) -> MpsDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
