"""hack/image/ociarchive.py: what it writes parses back, blobs are named by their digests, bytes reproduce."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_ociarchive() -> ModuleType:
    # hack/ is tooling, not a package: load the script by path (dataclasses need it in sys.modules).
    spec = importlib.util.spec_from_file_location("ociarchive", REPO / "hack" / "image" / "ociarchive.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ociarchive"] = module
    spec.loader.exec_module(module)
    return module


oci = _load_ociarchive()

FILES = {"etc/hello.txt": b"hello from a layer\n", "usr/bin/tool": b"#!/bin/sh\necho tool\n"}


def _layer_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


IMAGE = oci.ImageConfig(
    entrypoint=["tensorwasm"],
    cmd=["--help"],
    user="65532:65532",
    env=["PATH=/usr/bin", "PYTHONDONTWRITEBYTECODE=1"],
    workdir="/tmp",
    labels={"org.opencontainers.image.source": "tensorwasm"},
)


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_round_trip_names_every_blob_by_its_digest(tmp_path: Path, compression: str) -> None:
    layer = _layer_tar(tmp_path / "layer.tar", FILES)
    out = tmp_path / "image.tar"
    digest = oci.write_archive(
        out, "tensorwasm.io/tensorwasm:0.1.0-dev", [layer], IMAGE, compression=compression
    )

    parsed = oci.read_archive(out)  # raises if a blob's bytes do not match its name
    assert parsed.manifest_digest == digest
    assert parsed.blob_digests["blobs/sha256/" + digest.split(":")[1]] == digest
    entry = parsed.index["manifests"][0]
    assert entry["mediaType"] == oci.MEDIA_MANIFEST
    assert entry["annotations"] == {
        "io.containerd.image.name": "tensorwasm.io/tensorwasm:0.1.0-dev",
        "org.opencontainers.image.ref.name": "0.1.0-dev",
    }
    # The config's diff_id is the digest of the uncompressed layer tar, whatever the blob's encoding.
    assert parsed.config["rootfs"]["diff_ids"] == [_sha(layer.read_bytes())]
    layer_desc = parsed.manifest["layers"][0]
    assert layer_desc["mediaType"] == (oci.MEDIA_LAYER_GZIP if compression == "gzip" else oci.MEDIA_LAYER_TAR)
    assert parsed.blob_digests["blobs/sha256/" + layer_desc["digest"].split(":")[1]] == layer_desc["digest"]
    runtime = parsed.config["config"]
    assert runtime["Entrypoint"] == ["tensorwasm"]
    assert runtime["Cmd"] == ["--help"]
    assert runtime["User"] == "65532:65532"
    assert runtime["Env"] == ["PATH=/usr/bin", "PYTHONDONTWRITEBYTECODE=1"]
    assert runtime["WorkingDir"] == "/tmp"
    assert runtime["Labels"] == {"org.opencontainers.image.source": "tensorwasm"}
    assert parsed.config["architecture"] == oci.oci_architecture()

    contents = {}
    for layer_tar in oci.iter_layer_tars(out):
        for member in layer_tar:
            reader = layer_tar.extractfile(member)
            assert reader is not None
            contents[member.name] = reader.read()
    assert contents == FILES


def test_the_archive_is_reproducible_and_sorted(tmp_path: Path) -> None:
    layer = _layer_tar(tmp_path / "layer.tar", FILES)
    first = tmp_path / "a" / "image.tar"
    second = tmp_path / "b" / "image.tar"
    assert oci.write_archive(first, "x.io/y:1", [layer], IMAGE) == oci.write_archive(
        second, "x.io/y:1", [layer], IMAGE
    )
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    blobs = [m.name for m in members if m.name.startswith("blobs/sha256/")]
    assert blobs == sorted(blobs)
    assert {m.mtime for m in members} == {0}
    assert {(m.uid, m.gid) for m in members} == {(0, 0)}
    assert not list(tmp_path.glob("*/.ociarchive-*")), "scratch directory left behind"


def test_a_gzipped_input_layer_has_the_same_diff_id(tmp_path: Path) -> None:
    plain = _layer_tar(tmp_path / "layer.tar", FILES)
    packed = tmp_path / "layer.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    oci.write_archive(tmp_path / "p.tar", "x.io/y:1", [plain], IMAGE)
    oci.write_archive(tmp_path / "g.tar", "x.io/y:1", [packed], IMAGE)
    assert (
        oci.read_archive(tmp_path / "p.tar").manifest_digest
        == oci.read_archive(tmp_path / "g.tar").manifest_digest
    )


def test_layers_stack_bottom_first(tmp_path: Path) -> None:
    base = _layer_tar(tmp_path / "base.tar", {"a": b"base"})
    top = _layer_tar(tmp_path / "top.tar", {"b": b"top"})
    out = tmp_path / "image.tar"
    oci.write_archive(out, "x.io/y:1", [base, top], IMAGE, compression="none")
    parsed = oci.read_archive(out)
    assert parsed.config["rootfs"]["diff_ids"] == [_sha(base.read_bytes()), _sha(top.read_bytes())]
    assert [d["digest"] for d in parsed.manifest["layers"]] == parsed.config["rootfs"]["diff_ids"]
    assert len(parsed.config["history"]) == 2


def test_a_blob_whose_bytes_do_not_match_its_name_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "bad.tar"
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    with tarfile.open(out, "w") as tar:
        for name, data in {
            "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
            "index.json": index,
            "blobs/sha256/" + "0" * 64: b"not what the name says",
        }.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="holds content with digest"):
        oci.read_archive(out)


def test_cli_prints_the_manifest_digest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = _layer_tar(tmp_path / "layer.tar", FILES)
    out = tmp_path / "image.tar"
    code = oci.main(
        [
            "--name",
            "registry.k8s.io/pause:3.10",
            "--layer",
            str(layer),
            "--entrypoint",
            '["/pause"]',
            "--user",
            "65535",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--label",
            "k=v",
            "--compression",
            "none",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    parsed = oci.read_archive(out)
    assert capsys.readouterr().out.strip() == parsed.manifest_digest
    assert parsed.config["config"]["Entrypoint"] == ["/pause"]
    assert parsed.config["config"]["Env"] == ["A=1", "B=x=y"]
    assert parsed.config["config"]["Labels"] == {"k": "v"}
    assert parsed.index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "3.10"


def test_cli_names_a_missing_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = oci.main(
        ["--name", "x.io/y:1", "--layer", str(tmp_path / "nope.tar"), "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert "nope.tar" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_entrypoint_that_is_not_a_json_list(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        oci.build_arg_parser().parse_args(
            ["--name", "x", "--layer", "l", "--out", "o", "--entrypoint", "tensorwasm"]
        )


@pytest.mark.parametrize(
    ("ref", "tag"),
    [
        ("tensorwasm.io/tensorwasm:0.1.0-dev", "0.1.0-dev"),
        ("localhost:5000/repo/name:v1", "v1"),
        ("localhost:5000/repo/name", "latest"),
        ("busybox", "latest"),
    ],
)
def test_reference_tag(ref: str, tag: str) -> None:
    assert oci.reference_tag(ref) == tag
