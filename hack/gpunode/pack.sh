#!/usr/bin/env bash
# Packs the GPU node (issue 19) for the GPU machine and prints the exact `device` calls that bring it
# up there: `make gpu-node-plan`. Runs here (Debian, root, the dev cluster's binaries built).
#
# The GPU machine has no container runtime, no `ip`, no iptables and no registry, and each call carries
# at most 64 MiB of working tree. So everything the node needs travels in one zstd-compressed tar, split
# into parts under .gpunode/ (ignored by git, named in `carry`), one part per call, back to back (the
# machine keeps /var/tmp while it stays warm, about 30 s after a call):
#   bin/     the multi-call Kubernetes binary (etcd, kube-apiserver, ..., kubelet, kube-proxy, kubectl),
#            containerd, its runc shim, ctr, helm, the GPU device plugin (hack/gpunode/deviceplugin)
#   images/  the pause image and the project's image (`make image`), OCI archives
#   root/    Debian packages unpacked (runc, CNI plugins, iptables, iproute2 and their libraries),
#            used through wrappers (hack/gpunode/node-host.sh) and never unpacked over the host's /
#   wasm/    the tenants' modules the checks use; chart/ the chart the image was built with
# kwok is left out (the GPU node needs no fake nodes).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
OUT_DIR=${GPU_NODE_PAYLOAD_DIR:-$REPO/.gpunode}
PART_MIB=${GPU_NODE_PART_MIB:-56}
STAGE=$(mktemp -d /var/tmp/tw-gpunode-stage.XXXXXX)
trap 'rm -rf "$STAGE"' EXIT
say() { echo "[gpunode pack $(date -u +%T)] $*" >&2; }

BIN=${TENSORWASM_CONTROLPLANE_BIN:-$(bash hack/controlplane/build.sh | tail -1)}
CACHE=${GPU_NODE_CACHE:-$HOME/.cache/tensorwasm/gpunode}
mkdir -p "$CACHE" "$STAGE"/{node,app}
# Two zstd streams, concatenated and then split: the node (binaries, Debian packages; reused while
# its inputs are unchanged) and the app (the image, the chart it matches, the tenants' modules).
node_key=$( (sha256sum "$BIN"/{tensorwasm-kube,containerd,containerd-shim-runc-v2,ctr,helm}; \
  cat hack/gpunode/deviceplugin/*.go hack/gpunode/deviceplugin/go.mod hack/gpunode/pack.sh) | sha256sum | cut -c1-16)
if [[ ! -s $CACHE/node-$node_key.tar.zst ]]; then
  say "node binaries from $BIN"
  N=$STAGE/node
  mkdir -p "$N"/{bin,images,root,debs}
  cp "$BIN"/{tensorwasm-kube,containerd,containerd-shim-runc-v2,ctr,helm} "$N/bin/"
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    ln -s tensorwasm-kube "$N/bin/$name"
  done
  cp "$(dirname "$BIN")/images/pause.oci.tar" "$N/images/pause.oci.tar"
  say "building the device plugin"
  (cd hack/gpunode/deviceplugin && go test ./... >&2 && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o "$N/bin/tensorwasm-gpu-plugin" .)
  say "Debian packages"
  debs=(runc libseccomp2 containernetworking-plugins iptables libip4tc2 libip6tc2 libxtables12 libnftnl11 libmnl0
        libnetfilter-conntrack3 libnfnetlink0 iproute2 libbpf1 libelf1 libbsd0 libmd0 libcap2 libdb5.3 libtirpc3
        libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libkeyutils1 libcom-err2 libselinux1 libpcre2-8-0
        zlib1g libzstd1 openssl libssl3)
  (cd "$N/debs" && apt-get download "${debs[@]}" >/dev/null 2>&1)
  for deb in "$N"/debs/*.deb; do dpkg -x "$deb" "$N/root"; done
  rm -rf "$N/debs" "$N"/root/usr/share/{doc,man,locale,bash-completion,lintian}
  say "compressing the node ($(du -sh "$N" | cut -f1))"
  rm -f "$CACHE"/node-*.tar.zst
  tar -C "$N" -cf - . | zstd -q -9 -T0 --long=27 >"$CACHE/node-$node_key.tar.zst.tmp"
  mv "$CACHE/node-$node_key.tar.zst.tmp" "$CACHE/node-$node_key.tar.zst"
fi

A=$STAGE/app
mkdir -p "$A"/{images,wasm}
if [[ -n ${TENSORWASM_GPU_NODE_IMAGE:-} ]]; then
  archive=$TENSORWASM_GPU_NODE_IMAGE
  ref=${TENSORWASM_GPU_NODE_IMAGE_REF:-tensorwasm.io/tensorwasm:0.1.0-dev}
else
  info=$("$REPO/.venv/bin/python" hack/image/build.py)
  archive=$(sed -n 's/^archive: *//p' <<<"$info")
  ref=$(sed -n 's/^image: *//p' <<<"$info")
fi
say "image $ref from $archive"
cp "$archive" "$A/images/tensorwasm.oci.tar"
echo "$ref" >"$A/images/tensorwasm.ref"
# The chart as it was when the image was built: the operator refuses settings it does not know.
cp -r "${TENSORWASM_GPU_NODE_CHART:-helm/tensorwasm}" "$A/chart"

say "tenant modules"
"$REPO/.venv/bin/python" - "$A/wasm" <<'PY'
import sys, pathlib, wasmtime
out = pathlib.Path(sys.argv[1])
for wat in ("tests/fixtures/vector_add.wat", "bench/fixtures/gpu_step.wat", "tests/fixtures/counter.wat"):
    p = pathlib.Path(wat)
    (out / (p.stem + ".wasm")).write_bytes(wasmtime.wat2wasm(p.read_text()))
PY

say "compressing the app ($(du -sh "$A" | cut -f1))"
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
tar -C "$A" -cf - . | zstd -q -9 -T0 --long=27 >"$STAGE/app.tar.zst"
cat "$CACHE/node-$node_key.tar.zst" "$STAGE/app.tar.zst" | split -b "${PART_MIB}m" -d -a 1 - "$OUT_DIR/part-"
(cd "$OUT_DIR" && sha256sum part-* >SHA256SUMS)
grep -qxF '/.gpunode/' .git/info/exclude 2>/dev/null || echo '/.gpunode/' >>.git/info/exclude
du -b "$OUT_DIR"/part-* >&2
bash "$REPO/hack/gpunode/plan.sh"
