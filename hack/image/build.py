"""`make image`: build the repository's Containerfile without a container daemon, into an OCI archive.

Owns the daemonless execution of the recipe: a `FROM debian:<suite>-slim` base made by mmdebstrap,
each RUN run under chroot on an overlayfs layer of its own, COPY from the build context (honouring
.dockerignore) or from an earlier stage, a cache of layers keyed by what made them, and the final
stage flattened into one layer handed to ociarchive.py. The recipe itself is read, never restated:
containerfile.py parses it, so `docker build` elsewhere and this builder run the same instructions.
Needs root (chroot, mounts) and Linux with overlayfs. Must not import the tensorwasm package nor
anything outside the standard library (it runs before any virtualenv exists).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import buildcontext
import containerfile as cf  # sibling scripts, not a package
import debianbase
import ociarchive
from failures import BuildError, diagnose
from layers import Layer, mounted, overlay, prune, write_rootfs_tar

REPO = Path(__file__).resolve().parents[2]
# Bump when the way layers are made changes, so old cache entries are not reused.
BUILDER_VERSION = "2"
# Host CA bundle handed to RUN steps (TLS-intercepting proxies); never part of a layer.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_PATH = "/run/tensorwasm-build-ca.crt"
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def cache_root() -> Path:
    base = os.environ.get("TENSORWASM_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tensorwasm"
    )
    return Path(base) / "images"


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def default_ref() -> str:
    return f"tensorwasm.io/tensorwasm:{project_version()}-dev"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _log(message: str, started: float) -> None:
    print(f"[image {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)


# ---- running the stages ----


@dataclass
class StageResult:
    layers: list[Layer]
    state: cf.StageState
    key: str


@dataclass
class Builder:
    context: Path
    recipe_path: Path
    cache: Path
    build_args: dict[str, str] = field(default_factory=dict)
    refresh_base: bool = False
    started: float = field(default_factory=time.monotonic)
    used: set[str] = field(default_factory=set)

    def layer(self, key: str) -> Layer:
        self.used.add(key)
        return Layer(key, self.cache / "layers" / key)

    def build(self) -> StageResult:
        recipe = cf.parse(self.recipe_path.read_text())
        global_args = cf.global_arg_values(recipe, self.build_args)
        self.files = buildcontext.context_files(self.context)
        results: dict[str, StageResult] = {}
        result: StageResult | None = None
        (self.cache / "scratch").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache / "scratch") as scratch:
            for index, stage in enumerate(recipe.stages):
                result = self.run_stage(stage, index, global_args, results, Path(scratch))
                results[str(index)] = result
                if stage.name:
                    results[stage.name] = result
        assert result is not None
        return result

    def base_layers(self, base: str, results: dict[str, StageResult]) -> tuple[list[Layer], str]:
        if base in results:
            return list(results[base].layers), results[base].key
        suite = debianbase.debian_suite(base)
        key = _key("debian-slim", BUILDER_VERSION, *debianbase.recipe_parts(suite))
        layer = self.layer(key)
        if not layer.done:
            _log(f"FROM {base}: mmdebstrap {suite} (minbase, slim)", self.started)
            debianbase.build_debian_base(layer, suite)
        else:
            _log(f"FROM {base}: cached", self.started)
        return [layer], key

    def run_stage(
        self,
        stage: cf.Stage,
        index: int,
        global_args: dict[str, str],
        results: dict[str, StageResult],
        scratch: Path,
    ) -> StageResult:
        base = cf.expand(stage.base, global_args)
        layers, key = self.base_layers(base, results)
        state = cf.StageState()
        label = stage.name or f"stage {index}"
        for instruction in stage.instructions:
            if instruction.keyword not in ("RUN", "COPY", "WORKDIR"):
                cf.apply_metadata(state, instruction, self.build_args, global_args)
                continue
            if instruction.keyword == "WORKDIR":
                cf.apply_metadata(state, instruction, self.build_args, global_args)
                command = f"mkdir -p {state.workdir}"
                recipe = ["WORKDIR", state.workdir]
            elif instruction.keyword == "RUN":
                command = instruction.value
                recipe = [
                    "RUN",
                    *instruction.flags,
                    command,
                    json.dumps(state.run_environment(), sort_keys=True),
                ]
            else:
                command = ""
                recipe = ["COPY", *instruction.flags, cf.expand(instruction.value, state.run_environment())]
                if not any(flag.startswith("--from=") for flag in instruction.flags):
                    # Keyed by the files this COPY takes, so `COPY pyproject.toml` outlives source edits.
                    sources = cf.expand(instruction.value, state.run_environment()).split()[:-1]
                    chosen = [
                        name
                        for source in sources
                        for name, _ in buildcontext.select_sources(self.files, source)
                    ]
                    recipe.append(buildcontext.context_digest(self.context, chosen))
                else:
                    source = instruction_from(instruction)
                    if source not in results:
                        raise BuildError(f"line {instruction.line}: COPY --from={source}: no such stage")
                    recipe.append(results[source].key)
            key = _key(key, *recipe)
            layer = self.layer(key)
            summary = f"{label}: {instruction.keyword} {' '.join(instruction.flags)} {instruction.value}"
            summary = summary if len(summary) < 100 else summary[:97] + "..."
            if layer.done:
                _log(f"{summary} (cached)", self.started)
            else:
                _log(summary, self.started)
                layer.begin()
                if instruction.keyword == "COPY":
                    self.copy(instruction, state, layers, layer, results, scratch)
                else:
                    self.run(command, instruction, state, layers, layer, scratch)
                layer.commit()
            layers.append(layer)
        return StageResult(layers, state, key)

    def run(
        self,
        command: str,
        instruction: cf.Instruction,
        state: cf.StageState,
        lowers: list[Layer],
        upper: Layer,
        scratch: Path,
    ) -> None:
        cache_mounts = [_cache_target(flag, instruction.line) for flag in instruction.flags]
        env = dict(state.run_environment())
        env.update({name: os.environ[name] for name in PASSED_ENV if name in os.environ})
        if HOST_CA_BUNDLE.exists():
            env.update(SSL_CERT_FILE=BUILD_CA_PATH, PIP_CERT=BUILD_CA_PATH, REQUESTS_CA_BUNDLE=BUILD_CA_PATH)
        with overlay(lowers, scratch, upper) as root, contextlib.ExitStack() as mounts:
            mounts.enter_context(mounted(["-t", "proc", "proc"], root / "proc"))
            mounts.enter_context(mounted(["--bind", "/dev"], root / "dev"))
            resolv = root / "etc" / "resolv.conf"
            if resolv.exists() and not resolv.is_symlink():
                mounts.enter_context(mounted(["--bind", "-o", "ro", "/etc/resolv.conf"], resolv))
            created: list[Path] = []
            if HOST_CA_BUNDLE.exists():
                ca = root / BUILD_CA_PATH.lstrip("/")
                ca.parent.mkdir(parents=True, exist_ok=True)
                ca.touch()
                created.append(ca)
                mounts.enter_context(mounted(["--bind", "-o", "ro", str(HOST_CA_BUNDLE)], ca))
            for target in cache_mounts:
                host_dir = self.cache / "mounts" / _key(target)
                host_dir.mkdir(parents=True, exist_ok=True)
                inside = root / target.lstrip("/")
                inside.mkdir(parents=True, exist_ok=True)
                mounts.enter_context(mounted(["--bind", str(host_dir)], inside))
            workdir = state.workdir

            def enter_root() -> None:
                os.chroot(root)
                os.chdir(workdir if os.path.isdir(workdir) else "/")

            with tempfile.TemporaryFile(dir=scratch) as output:
                process = subprocess.run(
                    ["/bin/sh", "-c", command],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    preexec_fn=enter_root,
                    check=False,
                )
                output.seek(0)
                text = output.read().decode(errors="replace")
            mounts.close()
            for path in created:
                path.unlink(missing_ok=True)
        if process.returncode != 0:
            problems = diagnose(text)
            raise BuildError(
                f"line {instruction.line}: RUN failed (exit {process.returncode}):\n"
                f"{text[-3000:]}\n"
                + ("\n".join(problems) if problems else "(no missing package or wheel recognised)")
            )

    def copy(
        self,
        instruction: cf.Instruction,
        state: cf.StageState,
        lowers: list[Layer],
        upper: Layer,
        results: dict[str, StageResult],
        scratch: Path,
    ) -> None:
        words = cf.expand(instruction.value, state.run_environment()).split()
        if len(words) < 2:
            raise BuildError(f"line {instruction.line}: COPY needs SOURCE... DEST")
        *sources, dest = words
        if not dest.startswith("/"):
            dest = state.workdir.rstrip("/") + "/" + dest
        unsupported = [f for f in instruction.flags if not f.startswith("--from=")]
        if unsupported:
            raise BuildError(f"line {instruction.line}: COPY flags {unsupported} are not supported")
        with overlay(lowers, scratch, upper) as root:
            target = root / dest.lstrip("/")
            source_stage = instruction_from(instruction)
            if source_stage is None:
                buildcontext.copy_context(self.context, self.files, sources, target, dest.endswith("/"))
                return
            with overlay(results[source_stage].layers, scratch) as source_root:
                for source in sources:
                    origin = source_root / source.lstrip("/")
                    if not origin.exists():
                        raise BuildError(
                            f"line {instruction.line}: {source} not found in stage {source_stage}"
                        )
                    if origin.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        subprocess.run(["cp", "-a", f"{origin}/.", str(target)], check=True)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        subprocess.run(["cp", "-a", str(origin), str(target)], check=True)


def instruction_from(instruction: cf.Instruction) -> str | None:
    for flag in instruction.flags:
        if flag.startswith("--from="):
            return flag.removeprefix("--from=")
    return None


def _cache_target(flag: str, line: int) -> str:
    if not flag.startswith("--mount="):
        raise BuildError(f"line {line}: RUN flag {flag} is not supported")
    options = dict(item.partition("=")[::2] for item in flag.removeprefix("--mount=").split(","))
    if options.get("type") != "cache" or not options.get("target"):
        raise BuildError(f"line {line}: only RUN --mount=type=cache,target=DIR is supported, got {flag}")
    return options["target"]


def image_config(state: cf.StageState) -> ociarchive.ImageConfig:
    return ociarchive.ImageConfig(
        entrypoint=state.entrypoint,
        cmd=state.cmd,
        user=state.user,
        env=state.config_env(),
        workdir=state.workdir if state.workdir != "/" else None,
        labels=state.labels,
    )


def build_image(
    *,
    ref: str,
    out: Path | None,
    build_args: dict[str, str],
    compression: str,
    refresh_base: bool,
    keep_rootfs: bool,
    context: Path = REPO,
) -> tuple[Path, str]:
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    # One build at a time per cache: a second one (a test fixture, another shell) waits here.
    lock = (cache / "lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    if refresh_base:  # every layer above the base depends on it
        shutil.rmtree(cache / "layers", ignore_errors=True)
    builder = Builder(context, context / "Containerfile", cache, build_args, refresh_base)
    debianbase.ensure_host_tools()
    final = builder.build()
    config = image_config(final.state)
    archive = out or cache / f"{ref.rsplit('/', 1)[-1].replace(':', '-')}.oci.tar"
    stamp = archive.with_name(archive.name + ".key")
    archive_key = _key(final.key, ref, compression, repr(config))
    if archive.exists() and stamp.exists() and stamp.read_text().split()[0] == archive_key:
        digest = stamp.read_text().split()[1]
        _log(f"archive unchanged: {archive}", builder.started)
        if keep_rootfs:
            with tempfile.TemporaryDirectory(dir=cache / "scratch") as scratch:
                write_rootfs_tar(final.layers, Path(scratch), cache / "rootfs.tar")
    else:
        with tempfile.TemporaryDirectory(dir=cache / "scratch") as scratch:
            rootfs = Path(scratch) / "rootfs.tar"
            _log("flattening the final stage", builder.started)
            write_rootfs_tar(final.layers, Path(scratch), rootfs)
            _log(
                f"rootfs {rootfs.stat().st_size / 2**20:.1f} MiB uncompressed; writing {archive}",
                builder.started,
            )
            digest = ociarchive.write_archive(archive, ref, [rootfs], config, compression=compression)
            if keep_rootfs:
                shutil.copy(rootfs, cache / "rootfs.tar")
        stamp.write_text(f"{archive_key} {digest}\n")
    prune(cache, builder.used)
    _log(f"done: {ref} {digest}", builder.started)
    return archive, digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Containerfile without a daemon (make image).")
    parser.add_argument(
        "--ref", default=None, help="image reference (default tensorwasm.io/tensorwasm:<version>-dev)"
    )
    parser.add_argument("--out", type=Path, help="archive path (default under the image cache)")
    parser.add_argument("--build-arg", action="append", default=[], help="KEY=VALUE, as docker build")
    # Uncompressed by default: 1 s to write against 16-22 s for gzip, and an import unpacks it only
    # 1-4 s slower (docs/performance.md); --compression gzip to push or carry it (82 MiB, not 257).
    parser.add_argument("--compression", choices=ociarchive.COMPRESSIONS, default="none")
    parser.add_argument("--refresh-base", action="store_true", help="re-run mmdebstrap (security updates)")
    parser.add_argument("--keep-rootfs", action="store_true", help="also leave rootfs.tar in the cache")
    parser.add_argument("--print-cache", action="store_true", help="print the cache directory and exit")
    parser.add_argument("--context", type=Path, default=REPO, help="build context holding the Containerfile")
    args = parser.parse_args(argv)
    if args.print_cache:
        print(cache_root())
        return 0
    build_args = dict(item.partition("=")[::2] for item in args.build_arg)
    try:
        archive, digest = build_image(
            ref=args.ref or default_ref(),
            out=args.out,
            build_args=build_args,
            compression=args.compression,
            refresh_base=args.refresh_base,
            keep_rootfs=args.keep_rootfs,
            context=args.context.resolve(),
        )
    except (BuildError, cf.ContainerfileError) as error:
        print(f"make image: {error}", file=sys.stderr)
        return 1
    print(f"image:   {args.ref or default_ref()}")
    print(f"digest:  {digest}")
    print(f"archive: {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
