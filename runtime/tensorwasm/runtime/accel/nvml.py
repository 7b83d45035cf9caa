"""NVML telemetry through pynvml: per-device memory total/used, utilisation and temperature.

Owns `NvmlTelemetry`, read lazily at scrape time. With no pynvml, no driver or no GPU it reports no
devices and raises nothing (a CPU-only shard simply has no such metrics). Must not import cuda or wasmtime.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceTelemetry:
    index: int
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_ratio: float  # GPU busy fraction over NVML's last sample period, 0..1
    temperature_celsius: float


class NvmlTelemetry:
    """Lazily initialised NVML reader; `read()` is [] whenever NVML is unusable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._tried = False
        self.unavailable_reason = ""

    def _init(self) -> None:
        self._tried = True
        try:
            import pynvml  # deferred: optional dependency, absent on CPU-only images

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self._nvml = pynvml
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
            self.unavailable_reason = f"{type(exc).__name__}: {exc}"
            log.info("Skipped NVML telemetry reason=%r", self.unavailable_reason)

    def read(self) -> list[DeviceTelemetry]:
        with self._lock:
            if not self._tried:
                self._init()
            nvml, handles = self._nvml, list(self._handles)
        if nvml is None:
            return []
        out: list[DeviceTelemetry] = []
        for index, handle in enumerate(handles):
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                temp = nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                name = nvml.nvmlDeviceGetName(handle)
            except Exception as exc:  # a device falling off the bus must not break a scrape
                log.warning("Failed to read NVML device=%d error=%r", index, exc)
                continue
            out.append(
                DeviceTelemetry(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(mem.total),
                    memory_used_bytes=int(mem.used),
                    utilization_ratio=float(util.gpu) / 100.0,
                    temperature_celsius=float(temp),
                )
            )
        return out

    def close(self) -> None:
        with self._lock:
            if self._nvml is not None:
                try:
                    self._nvml.nvmlShutdown()
                except Exception as exc:
                    log.debug("Ignored NVML shutdown error=%r", exc)
            self._nvml, self._handles = None, []
