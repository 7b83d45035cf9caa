#!/usr/bin/env bash
# The GPU machine's side of the GPU node (issue 19); runs there, in the repository copy, as root.
#   receive  keep the parts this call carried (.gpunode/part-*) in /var/tmp/tw-gpunode/parts
#   unpack   check every part against SHA256SUMS, unpack to /opt/tw-gpunode, make the host ready:
#            wrappers for ip/iptables/runc (Debian's, with their own libraries: the host has none),
#            the MPS pipe and log folders, the device-plugin folder
# Prints what it found; exits non-zero when a part is missing or damaged (start again from call 1).
set -euo pipefail
PARTS=/var/tmp/tw-gpunode/parts
ROOT=/opt/tw-gpunode
say() { echo "[gpunode $(date -u +%T)] $*"; }

receive() {
  mkdir -p "$PARTS"
  cp .gpunode/SHA256SUMS "$PARTS/"
  for part in .gpunode/part-*; do
    [[ -e $part ]] || continue
    cp "$part" "$PARTS/"
    say "kept $(basename "$part") ($(stat -c %s "$part") bytes)"
  done
  say "parts here: $(cd "$PARTS" && ls part-* | tr '\n' ' ')"
}

decompress() {
  if command -v zstd >/dev/null; then
    zstd -d -q --long=27 -c
  else  # the zstandard wheel from .whl (bench/run_gpu.sh installs it in /tmp/site)
    python3 -c 'import sys, zstandard
r = zstandard.ZstdDecompressor(max_window_size=1 << 27).stream_reader(sys.stdin.buffer, read_across_frames=True)
while chunk := r.read(1 << 22): sys.stdout.buffer.write(chunk)'
  fi
}

unpack() {
  (cd "$PARTS" && sha256sum -c --quiet SHA256SUMS) || { say "a part is missing or damaged: start again from the first call"; exit 2; }
  rm -rf "$ROOT"
  mkdir -p "$ROOT"
  local started=$SECONDS
  cat "$PARTS"/part-* | decompress | tar -C "$ROOT" -xif -  # two tar streams, one after the other
  say "unpacked $(du -sh "$ROOT" | cut -f1) in $((SECONDS - started)) s"
  local r=$ROOT/root libs="$ROOT/root/usr/lib/x86_64-linux-gnu:$ROOT/root/lib/x86_64-linux-gnu"
  mkdir -p "$ROOT/wrap"
  wrap() {  # name, real binary, [first argument]
    printf '#!/bin/sh\nLD_LIBRARY_PATH=%s XTABLES_LIBDIR=%s exec %s %s "$@"\n' \
      "$libs" "$r/usr/lib/x86_64-linux-gnu/xtables" "$2" "${3:-}" >"$ROOT/wrap/$1"
    chmod +x "$ROOT/wrap/$1"
  }
  wrap ip "$r/bin/ip"
  wrap runc "$r/usr/sbin/runc"
  command -v openssl >/dev/null || wrap openssl "$r/usr/bin/openssl"
  # iptables: nftables where this kernel has it, else the legacy tables, else none (then no
  # kube-proxy Services: the checks call pods by their address).
  local backend=none
  for multi in xtables-nft-multi xtables-legacy-multi; do
    if LD_LIBRARY_PATH=$libs XTABLES_LIBDIR=$r/usr/lib/x86_64-linux-gnu/xtables "$r/usr/sbin/$multi" iptables -t nat -L -n >/dev/null 2>"$ROOT/iptables-$multi.err"; then
      backend=$multi
      break
    fi
  done
  if [[ $backend != none ]]; then
    for cmd in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
      wrap "$cmd" "$r/usr/sbin/$backend" "$cmd"
    done
  fi
  echo "$backend" >"$ROOT/iptables-backend"
  say "iptables: $backend; $("$ROOT/wrap/ip" -V 2>&1 | head -1); $("$ROOT/wrap/runc" --version | head -1)"
  command -v nsenter >/dev/null || say "WARNING: no nsenter on this host"
  # The MPS control daemon (a pod, uid 65532) and its clients (shard pods, same uid) share these.
  # cgroup v2: the node's cgroup tree needs the controllers enabled from the root.
  for c in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
  done
  mkdir -p /run/nvidia-mps /var/log/nvidia-mps /var/lib/kubelet/device-plugins /var/run/cdi
  chmod 1777 /run/nvidia-mps /var/log/nvidia-mps
}

case ${1:-} in
  receive) receive ;;
  unpack) unpack ;;
  *) echo "usage: $0 receive|unpack" >&2; exit 64 ;;
esac
