#!/usr/bin/env bash
# Installs the Debian packages the real dev-cluster node needs (runc, CNI plugins, iptables, ...).
# Idempotent: installs nothing when every command is already there. Needs root (CI runs as root).
set -euo pipefail

# command-or-path  debian-package
needs=(
  "runc runc"
  "/usr/lib/cni/bridge containernetworking-plugins"
  "iptables iptables"
  "ip iproute2"
  "nsenter util-linux"
  "openssl openssl"
  "/bin/busybox busybox-static"  # the node tests' tiny server image
  "promtool prometheus"  # alert rule unit tests; the dev cluster's Prometheus image
)

missing=()
for pair in "${needs[@]}"; do
  read -r what pkg <<<"$pair"
  if [[ $what == /* ]]; then [[ -e $what ]] && continue; else command -v "$what" >/dev/null && continue; fi
  missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
  echo "hack/node/deps.sh: missing Debian packages: ${missing[*]} (install them as root: apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "hack/node/deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt run (another engineer, CI step) may hold the lock: wait for it rather than fail.
apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@"; }
apt_get install -y --no-install-recommends "${missing[@]}" >&2 || { apt_get update >&2 && apt_get install -y --no-install-recommends "${missing[@]}" >&2; }
# Only prometheus' binaries are wanted: on a host with systemd its package starts a server on :9090,
# the shards' admin port in local tests.
if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
  systemctl disable --now prometheus.service >&2 || true
fi
