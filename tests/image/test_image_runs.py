"""The image `make image` writes runs as Kubernetes runs it: runc, uid 65532, read-only root, no capabilities.

Proves the archive (not the build cache) holds a working tensorwasm: `--help`, and a standalone
runtime shard that answers an invoke from the host with a tenant of examples/tenants.yaml.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.bundle import REPO, build_runc_config, write_bundle
from tests.image.conftest import BuiltImage

sys.path.insert(0, str(REPO / "hack" / "image"))
import containerfile  # hack/image is scripts, not a package

# The budget of issue 11 (uncompressed, without CUDA user-space, which the NVIDIA runtime mounts).
SIZE_BUDGET_BYTES = 300 * 2**20
READY_DEADLINE_S = 180  # a cold Python start on a 2-core box shared with Go builds


def _run(
    runc: str, image: BuiltImage, bundle: Path, args: list[str], **binds: Path
) -> subprocess.CompletedProcess[str]:
    config = build_runc_config(image.config, image.rootfs, args, binds={f"/{k}": v for k, v in binds.items()})
    write_bundle(bundle, config)
    container = f"tw-image-{uuid.uuid4().hex[:10]}"
    try:
        return subprocess.run(
            [runc, "run", "--bundle", str(bundle), container],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        subprocess.run([runc, "delete", "--force", container], capture_output=True, check=False)


def test_the_image_config_is_the_containerfiles(built_image: BuiltImage) -> None:
    declared = containerfile.final_image_state(containerfile.parse((REPO / "Containerfile").read_text()))
    runtime = built_image.config["config"]
    assert runtime["Entrypoint"] == declared.entrypoint == ["tensorwasm"]
    assert runtime["User"] == declared.user
    assert runtime["Env"] == declared.config_env()
    assert runtime["WorkingDir"] == declared.workdir
    assert runtime["Labels"] == declared.labels
    assert built_image.ref.startswith("tensorwasm.io/tensorwasm:")


def test_the_image_fits_its_size_budget(built_image: BuiltImage) -> None:
    size = sum(p.lstat().st_size for p in built_image.rootfs.rglob("*") if not p.is_dir())
    assert size <= SIZE_BUDGET_BYTES, f"image holds {size / 2**20:.0f} MiB (budget 300 MiB)"
    assert not (built_image.rootfs / "usr" / "bin" / "gcc").exists(), "a compiler in the final image"


def test_help_runs_as_65532_on_a_read_only_root(runc: str, built_image: BuiltImage, tmp_path: Path) -> None:
    result = _run(runc, built_image, tmp_path / "help", ["--help"])
    assert result.returncode == 0, result.stderr
    assert "usage: tensorwasm" in result.stdout
    assert "runtime" in result.stdout and "operator" in result.stdout

    probe = (
        "import os, sys\n"
        "print(os.getuid(), os.getgid())\n"
        "root = [l.split() for l in open('/proc/self/mountinfo') if l.split()[4] == '/']\n"
        "print('ro' in root[-1][5].split(','))\n"
        "import tensorwasm.runtime.engine, tensorwasm.operator, cuda.bindings, wasmtime, numpy\n"
        "import zstandard, uvloop, yaml, aiohttp, kopf, tensorwasm.kube.client, pynvml\n"
        "print('imports ok')\n"
    )
    config_args = ["-c", probe]
    image = BuiltImage(
        built_image.archive,
        built_image.ref,
        built_image.digest,
        built_image.rootfs,
        {**built_image.config, "config": {**built_image.config["config"], "Entrypoint": ["python3"]}},
        built_image.manifest,
    )
    result = _run(runc, image, tmp_path / "probe", config_args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["65532 65532", "True", "imports ok"]
    assert "Read-only file system" not in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def runtime_container(runc: str, built_image: BuiltImage, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """`tensorwasm runtime --tenants-file examples/tenants.yaml` in a container; yields (port, log)."""
    port = _free_port()
    args = [
        "runtime",
        "--tenants-file", "/data/examples/tenants.yaml",
        "--listen", f"127.0.0.1:{port}",
        "--accelerator", "cpu",
        "--module-dirs", "/data",  # the examples name modules in ../tests/fixtures
    ]  # fmt: skip
    binds = {"/data/examples": REPO / "examples", "/data/tests/fixtures": REPO / "tests" / "fixtures"}
    write_bundle(
        tmp_path / "runtime", build_runc_config(built_image.config, built_image.rootfs, args, binds=binds)
    )
    container = f"tw-image-{uuid.uuid4().hex[:10]}"
    log = tmp_path / "runtime.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [runc, "run", "--bundle", str(tmp_path / "runtime"), container],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port, log
    finally:
        subprocess.run([runc, "kill", container, "KILL"], capture_output=True, check=False)
        process.wait(timeout=60)
        subprocess.run([runc, "delete", "--force", container], capture_output=True, check=False)


def _get(port: int, path: str) -> int | None:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        return connection.getresponse().status
    except OSError:
        return None


def test_the_runtime_in_the_image_answers_an_invoke(runtime_container: tuple[int, Path]) -> None:
    port, log = runtime_container
    deadline = time.monotonic() + READY_DEADLINE_S
    while _get(port, "/readyz") != 200:
        assert time.monotonic() < deadline, f"not ready after {READY_DEADLINE_S}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)  # polling an observable state, not waiting for luck
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST",
        "/v1/functions/echo/invoke",
        body=b"hello from the image",
        headers={"Authorization": "Bearer demo-token-alpha-0001"},
    )
    response = connection.getresponse()
    body = response.read()
    assert response.status == 200, (body, log.read_text()[-3000:])
    assert body == b"hello from the image"
    output = log.read_text()
    assert "Read-only file system" not in output and "Permission denied" not in output, output[-3000:]


def test_the_archive_names_the_image_for_containerd(built_image: BuiltImage) -> None:
    index = json.loads(
        subprocess.run(
            ["tar", "-xOf", str(built_image.archive), "index.json"], capture_output=True, check=True
        ).stdout
    )
    entry = index["manifests"][0]
    assert entry["digest"] == built_image.digest
    assert entry["annotations"]["io.containerd.image.name"] == built_image.ref


def test_a_missing_debian_package_is_named(built_image: BuiltImage, tmp_path: Path) -> None:
    # A recipe of its own on the same (cached) base; a failed build prunes nothing of the image's cache.
    (tmp_path / "Containerfile").write_text(
        "FROM debian:bookworm-slim\nRUN apt-get update && apt-get install -y tensorwasm-no-such-package\n"
    )
    result = subprocess.run(
        [sys.executable, str(REPO / "hack" / "image" / "build.py"), "--context", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "missing Debian package: tensorwasm-no-such-package" in result.stderr
    assert "line 2: RUN failed" in result.stderr
    assert built_image.archive.exists()
