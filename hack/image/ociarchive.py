"""Write (and read back) an OCI image layout archive from layer tars, with the standard library only.

Owns the OCI image-layout format: the config, manifest and index documents (pure builders), the
content-addressed blobs, and the archive tar that `ctr -n k8s.io images import`, `skopeo copy
oci-archive:...` and `podman load` accept. It must not import anything outside the standard library:
the image build runs it with whatever Python the machine has, before any virtualenv exists.

Reproducible: the same layers and options give the same bytes (fixed mtimes and owners, sorted
entries, gzip without a timestamp or file name, canonical JSON), so the manifest digest names the
content, not the moment of the build.

    python3 hack/image/ociarchive.py --name tensorwasm.io/tensorwasm:0.1.0-dev \\
        --layer rootfs.tar --entrypoint '["tensorwasm"]' --user 65532:65532 --out image.oci.tar
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
COMPRESSIONS = ("gzip", "none")
# Level 6, not gzip's default 9: ~3x faster on a 200 MB rootfs for a few per cent of size.
GZIP_LEVEL = 6
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_Stream = IO[bytes] | gzip.GzipFile


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and its size."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class ImageConfig:
    """The runtime settings of the image (the OCI config's `config` object)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerBlob:
    """A layer written to a blob file: its descriptor, its uncompressed digest and where it lies."""

    descriptor: Descriptor
    diff_id: str
    path: Path


def oci_architecture(machine: str | None = None) -> str:
    """The GOARCH-style name OCI uses for this machine (x86_64 -> amd64)."""
    name = (machine or platform.machine()).lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(name, name)


def canonical_json(document: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace: one byte string per document, hence one digest."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def reference_tag(ref: str) -> str:
    """The tag of `registry/repo:tag` (OCI's ref.name is the tag; containerd's annotation the full name)."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


def build_config(
    diff_ids: Sequence[str],
    image: ImageConfig,
    *,
    architecture: str,
    created: str = "1970-01-01T00:00:00Z",
    os_name: str = "linux",
) -> dict[str, Any]:
    """The OCI image config document."""
    runtime: dict[str, Any] = {}
    if image.entrypoint is not None:
        runtime["Entrypoint"] = list(image.entrypoint)
    if image.cmd is not None:
        runtime["Cmd"] = list(image.cmd)
    if image.user:
        runtime["User"] = image.user
    if image.env:
        runtime["Env"] = list(image.env)
    if image.workdir:
        runtime["WorkingDir"] = image.workdir
    if image.labels:
        runtime["Labels"] = dict(image.labels)
    return {
        "architecture": architecture,
        "os": os_name,
        "created": created,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": created, "created_by": f"ociarchive layer {i}"} for i in range(len(diff_ids))
        ],
    }


def build_manifest(config: Descriptor, layers: Sequence[Descriptor]) -> dict[str, Any]:
    """The OCI image manifest document."""
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }


def build_index(manifest: Descriptor, ref: str, architecture: str) -> dict[str, Any]:
    """The archive's index.json: one manifest, named for both OCI tools and containerd."""
    entry = manifest.to_json()
    entry["platform"] = {"architecture": architecture, "os": "linux"}
    entry["annotations"] = {ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: reference_tag(ref)}
    return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}


def _open_tar_stream(path: Path) -> _Stream:
    """The layer's uncompressed tar bytes, whether the file is a plain or a gzipped tar."""
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    return path.open("rb")


def write_layer_blob(source: Path, workdir: Path, compression: str) -> LayerBlob:
    """Copy one layer tar into a blob file (compressed or not), hashing the tar as it streams."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {compression!r}")
    diff_hash = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=workdir, suffix=".blob")
    tmp = Path(tmp_name)
    with os.fdopen(fd, "wb") as raw_out, _open_tar_stream(source) as reader:
        if compression == "gzip":
            # filename="" and mtime=0 keep the gzip header free of the build's path and time.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw_out, compresslevel=GZIP_LEVEL, mtime=0
            ) as packed:
                _copy_hashing(reader, packed, diff_hash)
        else:
            _copy_hashing(reader, raw_out, diff_hash)
    diff_id = "sha256:" + diff_hash.hexdigest()
    if compression == "gzip":
        return LayerBlob(Descriptor(MEDIA_LAYER_GZIP, _file_digest(tmp), tmp.stat().st_size), diff_id, tmp)
    return LayerBlob(Descriptor(MEDIA_LAYER_TAR, diff_id, tmp.stat().st_size), diff_id, tmp)


def _copy_hashing(reader: _Stream, writer: _Stream, digest: Any) -> None:
    while chunk := reader.read(_CHUNK):
        digest.update(chunk)
        writer.write(chunk)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as blob:
        while chunk := blob.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_archive(
    out: Path,
    ref: str,
    layers: Sequence[Path],
    image: ImageConfig,
    *,
    compression: str = "gzip",
    architecture: str | None = None,
    created: str = "1970-01-01T00:00:00Z",
) -> str:
    """Write the OCI archive for `layers` (bottom first) and return the manifest digest."""
    if not layers:
        raise ValueError("an image needs at least one layer")
    arch = architecture or oci_architecture()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ociarchive-") as scratch:
        work = Path(scratch)
        blobs = [write_layer_blob(layer, work, compression) for layer in layers]
        config_bytes = canonical_json(
            build_config([b.diff_id for b in blobs], image, architecture=arch, created=created)
        )
        config = Descriptor(MEDIA_CONFIG, sha256_digest(config_bytes), len(config_bytes))
        manifest_bytes = canonical_json(build_manifest(config, [b.descriptor for b in blobs]))
        manifest = Descriptor(MEDIA_MANIFEST, sha256_digest(manifest_bytes), len(manifest_bytes))
        index_bytes = canonical_json(build_index(manifest, ref, arch))

        small: dict[str, bytes] = {config.digest: config_bytes, manifest.digest: manifest_bytes}
        big: dict[str, Path] = {b.descriptor.digest: b.path for b in blobs}
        partial = work / "archive.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info("blobs", 0, directory=True))
            tar.addfile(_tar_info("blobs/sha256", 0, directory=True))
            for digest in sorted(set(small) | set(big)):
                name = "blobs/sha256/" + digest.split(":", 1)[1]
                if digest in small:
                    tar.addfile(_tar_info(name, len(small[digest])), io.BytesIO(small[digest]))
                else:
                    with big[digest].open("rb") as blob:
                        tar.addfile(_tar_info(name, big[digest].stat().st_size), blob)
            tar.addfile(_tar_info("index.json", len(index_bytes)), io.BytesIO(index_bytes))
            layout = canonical_json({"imageLayoutVersion": "1.0.0"})
            tar.addfile(_tar_info("oci-layout", len(layout)), io.BytesIO(layout))
        # Rename into place so a reader never sees half an archive.
        os.replace(partial, out)
    return manifest.digest


# ---- reading back (tests, and unpacking a rootfs to run it) ----


@dataclass(frozen=True)
class ParsedArchive:
    """What an archive holds: its index, manifest and config, and the digest of each blob's bytes."""

    index: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]
    manifest_digest: str
    blob_digests: dict[str, str]  # member name -> sha256 of its bytes


def read_archive(path: Path) -> ParsedArchive:
    """Parse an OCI archive, hashing every blob; raise ValueError when a blob's name lies about it."""
    blob_digests: dict[str, str] = {}
    documents: dict[str, bytes] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            reader = tar.extractfile(member)
            assert reader is not None
            content_hash = hashlib.sha256()
            head = b""
            while chunk := reader.read(_CHUNK):
                content_hash.update(chunk)
                if len(head) < 1 << 16:
                    head += chunk
            blob_digests[member.name] = "sha256:" + content_hash.hexdigest()
            if member.size < 1 << 16:
                documents[member.name] = head
    for name, digest in blob_digests.items():
        if name.startswith("blobs/sha256/") and digest != "sha256:" + name.rsplit("/", 1)[1]:
            raise ValueError(f"{path}: blob {name} holds content with digest {digest}")
    if documents.get("oci-layout") is None or "index.json" not in documents:
        raise ValueError(f"{path}: not an OCI image layout (oci-layout or index.json missing)")
    index = json.loads(documents["index.json"])
    manifest_digest = index["manifests"][0]["digest"]
    manifest = json.loads(documents[_blob_name(manifest_digest)])
    config = json.loads(documents[_blob_name(manifest["config"]["digest"])])
    return ParsedArchive(index, manifest, config, manifest_digest, blob_digests)


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def iter_layer_tars(path: Path) -> Iterator[tarfile.TarFile]:
    """Open each layer of the archive's image, bottom first, as a tar (decompressed if gzip)."""
    parsed = read_archive(path)
    with tarfile.open(path, "r") as outer:
        for layer in parsed.manifest["layers"]:
            member = outer.extractfile(_blob_name(layer["digest"]))
            assert member is not None
            gzipped = layer["mediaType"] == MEDIA_LAYER_GZIP
            with tarfile.open(fileobj=member, mode="r|gz" if gzipped else "r|") as layer_tar:
                yield layer_tar


# ---- command line ----


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {text!r} ({error})") from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def _created_timestamp() -> str:
    # SOURCE_DATE_EPOCH is the reproducible-builds convention; without it, the epoch.
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="image reference, e.g. tensorwasm.io/tensorwasm:0.1.0")
    parser.add_argument(
        "--layer", action="append", required=True, type=Path, help="layer tar, bottom first (repeat)"
    )
    parser.add_argument("--entrypoint", type=_json_list, help="JSON list, e.g. '[\"tensorwasm\"]'")
    parser.add_argument("--cmd", type=_json_list, help="JSON list")
    parser.add_argument("--user", help="uid[:gid] or name")
    parser.add_argument("--env", action="append", default=[], type=_key_value, help="K=V (repeat)")
    parser.add_argument("--workdir")
    parser.add_argument("--label", action="append", default=[], type=_key_value, help="K=V (repeat)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="gzip")
    parser.add_argument("--architecture", help="default: this machine's (amd64, arm64)")
    parser.add_argument("--out", required=True, type=Path, help="archive to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    missing = [str(p) for p in args.layer if not p.is_file()]
    if missing:
        print(f"ociarchive: layer tar not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    image = ImageConfig(
        entrypoint=args.entrypoint,
        cmd=args.cmd,
        user=args.user,
        env=[f"{k}={v}" for k, v in args.env],
        workdir=args.workdir,
        labels=dict(args.label),
    )
    digest = write_archive(
        args.out,
        args.name,
        args.layer,
        image,
        compression=args.compression,
        architecture=args.architecture,
        created=_created_timestamp(),
    )
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
