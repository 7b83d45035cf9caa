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
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import containerfile as cf  # a sibling script, not a package
import ociarchive

REPO = Path(__file__).resolve().parents[2]
# Bump when the way layers are made changes, so old cache entries are not reused.
BUILDER_VERSION = "2"
# What debian:<suite>-slim is: Debian's minbase variant with docs, man pages and locales excluded
# by dpkg (debuerreotype's "slimify"); the same path-excludes stay in the image for later installs.
SLIM_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/groff/*",
    "path-exclude=/usr/share/lintian/*",
)
DEBIAN_MIRROR = os.environ.get("TENSORWASM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get(
    "TENSORWASM_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
# Host CA bundle handed to RUN steps (TLS-intercepting proxies); never part of a layer.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA_PATH = "/run/tensorwasm-build-ca.crt"
PASSED_ENV = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
HOST_TOOLS = {"mmdebstrap": "mmdebstrap", "chroot": "coreutils", "tar": "tar", "mount": "mount"}


class BuildError(RuntimeError):
    """The image cannot be built; the message says what is missing or which step failed."""


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


# ---- diagnosis of failed steps (pure) ----

_MISSING_PATTERNS = (
    (re.compile(r"Unable to locate package (\S+)"), "Debian package"),
    (re.compile(r"Package '?(\S+?)'? has no installation candidate"), "Debian package"),
    (re.compile(r"No matching distribution found for (\S+)"), "wheel"),
    (re.compile(r"Could not find a version that satisfies the requirement (\S+)"), "wheel"),
)


def diagnose(output: str) -> list[str]:
    """Name what a failed RUN was missing (Debian packages, wheels) from its output."""
    found: list[str] = []
    for pattern, kind in _MISSING_PATTERNS:
        for match in pattern.finditer(output):
            line = f"missing {kind}: {match.group(1)}"
            if line not in found:
                found.append(line)
    return found


# ---- host setup ----


def ensure_host_tools() -> None:
    """Install what the build needs from Debian (a fresh machine has no mmdebstrap)."""
    if os.geteuid() != 0:
        raise BuildError("make image needs root (chroot and overlay mounts); run it as root")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise BuildError(f"missing host tools and no apt-get to install them: Debian packages {missing}")
    print(f"image: installing host packages {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        problems = diagnose(result.stdout + result.stderr) or [result.stderr.strip()[-500:]]
        raise BuildError("cannot install the host tools: " + "; ".join(problems))


# ---- layers ----


@dataclass
class Layer:
    """One cached directory of file-system changes (an overlayfs upper dir)."""

    key: str
    root: Path

    @property
    def diff(self) -> Path:
        return self.root / "diff"

    @property
    def done(self) -> bool:
        return (self.root / "done").exists()

    def begin(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)  # a half-made layer from an interrupted build
        (self.root / "diff").mkdir(parents=True)
        (self.root / "work").mkdir()

    def commit(self) -> None:
        shutil.rmtree(self.root / "work", ignore_errors=True)
        (self.root / "done").write_text(str(time.time()))


@contextlib.contextmanager
def _mounted(args: Sequence[str], target: Path) -> Iterator[Path]:
    subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        if subprocess.run(["umount", str(target)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


@contextlib.contextmanager
def overlay(lowers: Sequence[Layer], scratch: Path, upper: Layer | None = None) -> Iterator[Path]:
    """Mount the layers (bottom first) at a scratch dir; writes go to `upper` when given."""
    merged = Path(tempfile.mkdtemp(dir=scratch, prefix="merged-"))
    empty = Path(tempfile.mkdtemp(dir=scratch, prefix="empty-"))
    # overlayfs wants two lower dirs when there is no upper: an empty one at the bottom costs nothing.
    lower_dirs = [str(layer.diff) for layer in reversed(lowers)] + ([] if upper else [str(empty)])
    options = "lowerdir=" + ":".join(lower_dirs)
    if upper is not None:
        options += f",upperdir={upper.diff},workdir={upper.root / 'work'}"
    try:
        with _mounted(["-t", "overlay", "overlay", "-o", options], merged):
            yield merged
    finally:
        merged.rmdir()
        empty.rmdir()


# ---- the Debian base (what `FROM debian:<suite>-slim` is, made here) ----

_DEBIAN_SLIM = re.compile(r"^(?:docker\.io/)?(?:library/)?debian:(?P<suite>[a-z]+)-slim$")


def debian_suite(base: str) -> str:
    match = _DEBIAN_SLIM.match(base)
    if match is None:
        raise BuildError(
            f"FROM {base}: the daemonless build makes debian:<suite>-slim bases only (no registry here)"
        )
    return match.group("suite")


def mmdebstrap_command(suite: str, target: Path) -> list[str]:
    return [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        "--quiet",
        # merged /usr by symlinks and the usr-is-merged marker, as the published images do: the
        # default (the usrmerge package) would drag perl (47 MiB) into the image.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        *(f"--dpkgopt={option}" for option in SLIM_DPKG_EXCLUDES),
        suite,
        str(target),
        f"deb {DEBIAN_MIRROR} {suite} main",
        f"deb {DEBIAN_MIRROR} {suite}-updates main",
        f"deb {DEBIAN_SECURITY_MIRROR} {suite}-security main",
    ]


def build_debian_base(layer: Layer, suite: str) -> None:
    layer.begin()
    command = mmdebstrap_command(suite, layer.diff)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"mmdebstrap {suite} failed:\n{result.stderr[-2000:]}")
    # Like the published images: the runtime bind-mounts these; the build's copies would leak.
    for name in ("etc/resolv.conf", "etc/hostname"):
        path = layer.diff / name
        path.unlink(missing_ok=True)
        path.write_text("")
    for leftover in (
        "var/lib/apt/lists/*",
        "var/cache/apt/*.bin",
        "var/cache/apt/archives/*.deb",
        "var/log/*.log",
    ):
        for item in layer.diff.glob(leftover):
            if item.is_file():
                item.unlink()
    layer.commit()


# ---- the build context ----


def context_files(context: Path) -> list[str]:
    """Files (and symlinks) of the build context that .dockerignore lets through, sorted."""
    ignore_file = context / ".dockerignore"
    rules = cf.parse_ignore(ignore_file.read_text()) if ignore_file.exists() else []
    reincluded = [pattern.split("/")[0] for excluded, pattern in rules if not excluded]
    kept: list[str] = []
    for directory, subdirs, files in os.walk(context):
        relative_dir = os.path.relpath(directory, context)
        prefix = "" if relative_dir == "." else relative_dir + "/"
        # Prune ignored directories that no `!` rule can reach into (.git, .venv are large).
        subdirs[:] = sorted(
            d
            for d in subdirs
            if not cf.is_ignored(prefix + d, rules)
            or any(fnmatch.fnmatchcase((prefix + d).split("/")[0], top) for top in reincluded)
        )
        kept.extend(prefix + f for f in sorted(files) if not cf.is_ignored(prefix + f, rules))
    return sorted(kept)


def context_digest(context: Path, files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        path = context / name
        digest.update(name.encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        else:
            digest.update(oct(path.stat().st_mode & 0o7777).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


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
        self.files = context_files(self.context)
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
        suite = debian_suite(base)
        key = _key("debian-slim", BUILDER_VERSION, suite, DEBIAN_MIRROR, *SLIM_DPKG_EXCLUDES)
        layer = self.layer(key)
        if not layer.done:
            _log(f"FROM {base}: mmdebstrap {suite} (minbase, slim)", self.started)
            build_debian_base(layer, suite)
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
                    chosen = [name for source in sources for name, _ in select_sources(self.files, source)]
                    recipe.append(context_digest(self.context, chosen))
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
            mounts.enter_context(_mounted(["-t", "proc", "proc"], root / "proc"))
            mounts.enter_context(_mounted(["--bind", "/dev"], root / "dev"))
            resolv = root / "etc" / "resolv.conf"
            if resolv.exists() and not resolv.is_symlink():
                mounts.enter_context(_mounted(["--bind", "-o", "ro", "/etc/resolv.conf"], resolv))
            created: list[Path] = []
            if HOST_CA_BUNDLE.exists():
                ca = root / BUILD_CA_PATH.lstrip("/")
                ca.parent.mkdir(parents=True, exist_ok=True)
                ca.touch()
                created.append(ca)
                mounts.enter_context(_mounted(["--bind", "-o", "ro", str(HOST_CA_BUNDLE)], ca))
            for target in cache_mounts:
                host_dir = self.cache / "mounts" / _key(target)
                host_dir.mkdir(parents=True, exist_ok=True)
                inside = root / target.lstrip("/")
                inside.mkdir(parents=True, exist_ok=True)
                mounts.enter_context(_mounted(["--bind", str(host_dir)], inside))
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
                _copy_context(self.context, self.files, sources, target, dest.endswith("/"))
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


def select_sources(files: Sequence[str], source: str) -> list[tuple[str, str]]:
    """(context file, path relative to the destination) for one COPY source: a file or a directory."""
    prefix = os.path.normpath(source).lstrip("/")
    if prefix == ".":
        return [(name, name) for name in files]
    if prefix in files:
        return [(prefix, Path(prefix).name)]
    return [(name, name[len(prefix) + 1 :]) for name in files if name.startswith(prefix + "/")]


def _copy_context(
    context: Path, files: Sequence[str], sources: Sequence[str], target: Path, into: bool
) -> None:
    """COPY from the build context: root-owned, modes and mtimes kept (as Docker does)."""
    for source in sources:
        chosen = select_sources(files, source)
        if not chosen:
            raise BuildError(f"COPY {source}: nothing in the build context (or all of it in .dockerignore)")
        single_file = len(chosen) == 1 and chosen[0][0] == os.path.normpath(source).lstrip("/")
        for name, relative in chosen:
            destination = target if single_file and not into else target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            origin = context / name
            if origin.is_symlink():
                destination.symlink_to(os.readlink(origin))
                os.lchown(destination, 0, 0)
                continue
            shutil.copy2(origin, destination)
            os.chown(destination, 0, 0)


# ---- flattening and the archive ----


def write_rootfs_tar(layers: Sequence[Layer], scratch: Path, out: Path) -> None:
    """The final stage's merged file system as one layer tar (whiteouts applied by overlayfs)."""
    with overlay(layers, scratch) as root:
        subprocess.run(
            ["tar", "--create", "--file", str(out), "--directory", str(root), "--sort=name",
             "--numeric-owner", "--xattrs", "--xattrs-include=security.capability", "--one-file-system", "."],
            check=True,
        )  # fmt: skip


def image_config(state: cf.StageState) -> ociarchive.ImageConfig:
    return ociarchive.ImageConfig(
        entrypoint=state.entrypoint,
        cmd=state.cmd,
        user=state.user,
        env=state.config_env(),
        workdir=state.workdir if state.workdir != "/" else None,
        labels=state.labels,
    )


def _prune(cache: Path, used: set[str]) -> None:
    """Drop layers the last build did not use (older versions of the recipe or sources)."""
    for entry in (cache / "layers").glob("*"):
        if entry.name not in used:
            shutil.rmtree(entry, ignore_errors=True)


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
    ensure_host_tools()
    final = builder.build()
    config = image_config(final.state)
    archive = out or cache / f"{ref.rsplit('/', 1)[-1].replace(':', '-')}.oci.tar"
    stamp = archive.with_name(archive.name + ".key")
    archive_key = _key(final.key, ref, compression, repr(config))
    if archive.exists() and stamp.exists() and stamp.read_text().split()[0] == archive_key:
        digest = stamp.read_text().split()[1]
        _log(f"archive unchanged: {archive}", builder.started)
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
    _prune(cache, builder.used)
    _log(f"done: {ref} {digest}", builder.started)
    return archive, digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the Containerfile without a daemon (make image).")
    parser.add_argument(
        "--ref", default=None, help="image reference (default tensorwasm.io/tensorwasm:<version>-dev)"
    )
    parser.add_argument("--out", type=Path, help="archive path (default under the image cache)")
    parser.add_argument("--build-arg", action="append", default=[], help="KEY=VALUE, as docker build")
    parser.add_argument("--compression", choices=ociarchive.COMPRESSIONS, default="gzip")
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
