"""`python -m tensorwasm.runtime` (= `tensorwasm runtime`): one runtime shard process.

Owns process wiring only: settings -> MPS client setup -> accelerator -> engine -> shard -> HTTP
server -> tenant source, then waits for SIGTERM/SIGINT. Exit codes: 0 on a signal, 2 for bad
settings or an unusable tenants file, 3 when the accelerator is poisoned (Kubernetes restarts the
pod: a sticky CUDA error cannot be cleared in-process), 1 when the tenant source failed.
Must not import wasmtime or cuda directly (engine/ and accel/ do).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tensorwasm.api.logs import configure_logging
from tensorwasm.runtime.settings import (
    AUTO_ADMIN_PORT,
    DEFAULT_ADMIN_PORT,
    RuntimeSettings,
    SettingsError,
    load_settings,
)

if TYPE_CHECKING:
    from tensorwasm.runtime.accel.base import Accelerator
    from tensorwasm.runtime.shard import Shard
    from tensorwasm.runtime.sources.kube import KubeSource
    from tensorwasm.runtime.sources.localfile import LocalFileSource

log = logging.getLogger("tensorwasm.runtime")

EXIT_OK, EXIT_SOURCE, EXIT_SETTINGS, EXIT_ACCELERATOR = 0, 1, 2, 3
# Within Kubernetes' default 30 s termination grace period, with room for the kubelet's own work.
SHUTDOWN_GRACE_S = 20
SHUTDOWN_HARD_S = 25  # the process is gone by then, whatever holds it


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except SettingsError as exc:
        print(f"tensorwasm runtime: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    return run_settings(settings)


def run_settings(settings: RuntimeSettings) -> int:
    configure_logging(settings.log_level, settings.log_format)  # the operator's format too
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_run(settings))
    except SettingsError as exc:
        print(f"tensorwasm runtime: {exc}", file=sys.stderr)
        return EXIT_SETTINGS


def _configure_signing(settings: RuntimeSettings) -> None:
    """The process's snapshot signing policy; a ring that cannot work stops the shard at start."""
    from tensorwasm.runtime.snapshots import signing

    mode: signing.Mode = settings.snapshot_signing  # type: ignore[assignment]  # settings validated it
    try:
        ring = signing.configure(signing.SigningPolicy(mode, settings.snapshot_signing_keys))
    except signing.KeyRingError as exc:
        raise SettingsError(f"--snapshot-signing/--snapshot-signing-keys: {exc}") from exc
    log.info(
        "Configured snapshot signing mode=%s keys=%d active=%s", mode, len(ring.keys), ring.active or "-"
    )


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (measured faster, see bench/bench_http.py), else the stdlib loop."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run(settings: RuntimeSettings) -> int:
    from tensorwasm.runtime import metrics
    from tensorwasm.runtime.api.app import build_admin_app, build_app
    from tensorwasm.runtime.api.server import serve
    from tensorwasm.runtime.engine import Engine
    from tensorwasm.runtime.errors import BadRequest
    from tensorwasm.runtime.modules import ModuleLoader
    from tensorwasm.runtime.shard import Shard
    from tensorwasm.runtime.snapshots.hot_tier import HOT_TIERS

    source = _build_source(settings)
    accelerator = _open_accelerator(settings)
    HOT_TIERS.configure(settings.snapshot_hot_tier_bytes)
    _configure_signing(settings)
    try:
        engine = Engine(
            cache_dir=settings.cache_dir,
            epoch_tick_s=settings.epoch_tick_ms / 1000,
            max_module_bytes=settings.max_module_bytes,
            cache_key_file=settings.cache_key_file,
        )
    except BadRequest as exc:
        raise SettingsError(f"--cache-dir/--cache-key-file: {exc.message}") from exc
    loader = ModuleLoader(
        engine, settings.max_module_bytes, settings.fetch_timeout_s, allowed_dirs=_module_dirs(settings)
    )
    shard = Shard(
        engine, accelerator, loader, default_gpu_memory_bytes=settings.default_gpu_memory_bytes,
        **_sleep_options(settings),
    )  # fmt: skip
    metrics.TENANT_LOAD.source = shard.load_report
    metrics.INVOKES.source = shard.invoke_report
    audit = None
    if settings.audit_log != "off":
        from tensorwasm.runtime.audit import AuditLog, AuditSettings

        try:
            audit = AuditLog(AuditSettings(target=settings.audit_log)).start()
        except OSError as exc:
            raise SettingsError(f"--audit-log: cannot write {settings.audit_log}: {exc.strerror}") from exc
    runner, port = await serve(build_app(shard, audit=audit), settings.host, settings.port)
    admin, admin_addr = None, "off"
    if settings.admin_port is not None:
        # Auto: 9090, or an ephemeral port beside an ephemeral tenant port (tests, local stacks).
        wanted = (
            settings.admin_port
            if settings.admin_port != AUTO_ADMIN_PORT
            else (DEFAULT_ADMIN_PORT if settings.port else 0)
        )
        admin_host = settings.admin_host or settings.host
        admin, admin_port = await serve(build_admin_app(shard), admin_host, wanted)
        admin_addr = f"{admin_host}:{admin_port}"
    log.info(
        "Runtime listening addr=%s:%d admin=%s source=%s accelerator=%s",
        settings.host,
        port,
        admin_addr,
        settings.source,
        getattr(accelerator, "name", "none"),
    )
    # Startup objects (modules, engine, imports) never die: keep them out of every GC pass.
    gc.freeze()
    # Guests' host calls re-take the GIL thousands of times a second from worker threads: a waiting
    # event loop may wait up to this long for a hand-over (--gil-switch-ms; Python's 5 ms default).
    sys.setswitchinterval(settings.gil_switch_ms / 1000)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = {
        "source": asyncio.create_task(source.run(shard)),
        "health": asyncio.create_task(_watch_health(shard, settings.health_interval_s)),
        "stop": asyncio.create_task(stop.wait()),
    }
    done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    if tasks["stop"] in done and hasattr(source, "hand_off"):
        await source.hand_off()  # a scaled-in shard serves until its tenants moved (bounded)
    code = EXIT_OK
    if tasks["health"] in done:
        code = EXIT_ACCELERATOR
    elif tasks["source"] in done:
        failure = tasks["source"].exception()
        log.error("Stopped: the tenant source failed: %s", failure, exc_info=failure)
        code = EXIT_SOURCE
    for task in tasks.values():
        task.cancel()
    _start_exit_watchdog(code)
    # No guest outlives the stop: every running guest (an invoke, a start function, tw_init) is
    # interrupted now, whatever its deadline, so draining and unloading finish at once.
    engine.interrupt_all()

    async def shut_down() -> None:
        await runner.cleanup()
        if admin is not None:
            await admin.cleanup()
        await shard.close()
        if audit is not None:
            await asyncio.to_thread(audit.close)  # what is queued is written

    try:
        await asyncio.wait_for(shut_down(), SHUTDOWN_GRACE_S)
    except TimeoutError:
        # Something that is not guest code (a compile, a fetch) holds a thread: the pod's grace
        # period is what counts, so leave without it.
        log.error("Stopped without a clean shutdown after %d s exit_code=%d", SHUTDOWN_GRACE_S, code)
        _exit_now(code)
    engine.close()
    accelerator.close()
    metrics.TENANT_LOAD.source = lambda: ()
    metrics.INVOKES.source = lambda: ()
    log.info("Runtime stopped exit_code=%d", code)
    return code


def _start_exit_watchdog(code: int) -> None:
    """A hard bound on everything after the stop, the event loop's close and the interpreter's exit
    included (both join worker threads without a timeout): a thread stuck outside guest code (a
    compile, a fetch, a driver call) cannot keep the pod past its grace period."""

    def expire() -> None:
        log.error("Stopped without a clean shutdown after %d s exit_code=%d", SHUTDOWN_HARD_S, code)
        _exit_now(code)

    timer = threading.Timer(SHUTDOWN_HARD_S, expire)
    timer.daemon = True
    timer.start()


def _sleep_options(settings: RuntimeSettings) -> dict[str, Any]:
    """Idle sleep needs a snapshot store (the sleepers' blobs and records live there, durably)."""
    from tensorwasm.api.tenant import idle_seconds
    from tensorwasm.runtime.snapshots.store import SnapshotStore

    if settings.snapshot_dir is None:
        if settings.idle_after != "never":
            log.warning("Idle sleep is off: --idle-after %s needs --snapshot-dir", settings.idle_after)
        return {}
    return {
        "sleep_store": SnapshotStore(settings.snapshot_dir),
        "idle_after_s": idle_seconds(settings.idle_after),
        "resident_gpu_bytes": settings.resident_gpu_bytes or None,
        "prewarm_tenants": settings.prewarm_tenants,
    }


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _watch_health(shard: Shard, interval_s: float) -> None:
    """Returns (ending the process) once the accelerator reports a poisoned context."""
    while True:
        health = shard.health()
        if health is not None and not health.ok:
            log.error("Accelerator poisoned, exiting so the pod restarts: %s", health.reason)
            return
        with contextlib.suppress(TimeoutError):  # asyncio.timeout: 3.11's wait_for can lose a cancel
            async with asyncio.timeout(interval_s):
                await shard.health_poke.wait()
        shard.health_poke.clear()


def _open_accelerator(settings: RuntimeSettings) -> Accelerator:
    from tensorwasm.runtime.accel import select_accelerator

    if settings.mps_pipe_dir is not None:
        from tensorwasm.runtime.accel import mps

        if settings.mps_start:
            mps.MpsDaemon(settings.mps_pipe_dir).start()
        mps.apply_client_env(mps.build_client_env(settings.mps_pipe_dir, device=settings.device))
    elif settings.mps_start:
        raise SettingsError("--mps-start needs --mps-pipe-dir")
    try:
        accelerator: Accelerator = select_accelerator(
            settings.accelerator, settings.device, settings.cache_dir
        )
        return accelerator
    except Exception as exc:  # no driver, no device, bad ordinal: refuse to start, say why
        raise SettingsError(f"--accelerator {settings.accelerator}: {exc}") from exc


def _module_dirs(settings: RuntimeSettings) -> list[Path] | None:
    """Where module files may be read from: --module-dirs, else the tenants file's directory and
    the working directory. The Kubernetes source names no files (ConfigMaps and URLs)."""
    if settings.module_dirs:
        return list(settings.module_dirs)
    if settings.tenants_file is None:
        return []
    return [settings.tenants_file.resolve().parent, Path.cwd()]


def _build_source(settings: RuntimeSettings) -> LocalFileSource | KubeSource:
    """The tenant source; a tenants file that cannot be used at all is a settings error."""
    if settings.tenants_file is not None:
        from tensorwasm.runtime.sources.localfile import LocalFileSource, TenantsFileError

        source = LocalFileSource(settings.tenants_file, poll_s=min(settings.resync_s, 2.0))
        try:
            source.first_read()
        except TenantsFileError as exc:
            raise SettingsError(str(exc)) from exc
        return source
    from tensorwasm.runtime.sources.kube import KubeSource

    return KubeSource(settings)


if __name__ == "__main__":
    sys.exit(main())
