#!/usr/bin/env bash
# Builds the dev cluster's binaries once into a cache outside the repo, keyed by version (and by a
# hash of the Go sources and build flags that choose them). ONE `go build` in ONE Go module
# (hack/controlplane/go.mod: Kubernetes, etcd, containerd, kwok and helm at one version set), so every
# package they share (client-go, api, grpc, protobuf, otel...) compiles once:
#   tensorwasm-kube: one multi-call executable (cmd/tensorwasm-kube) for etcd, kube-apiserver,
#           kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy, kwok, containerd
#           and ctr, symlinked by name (one link instead of ten);
#   helm and containerd-shim-runc-v2: main packages of their own modules (nothing to import; the
#           shim re-executes itself by path), built by the same `go build` through go.mod's tool
#           directives: they share every compiled package and only link on their own.
# Beside it, a small second lane: the static pause binary with its OCI image (the real node's sandbox
# image) and kwok's stage files.
# Prints the bin directory on the last line of stdout (Makefile and tests read it). Progress, with an
# estimate of the time left, goes to stderr.
#
# `build.sh keda` runs only lane 3, the autoscaler: KEDA's operator (keda) and metrics API server
# (keda-adapter) from its Go module at KEDA_VERSION, trimmed by keda_scalers.py to the prometheus,
# cpu and memory triggers (all of KEDA is ~3,450 packages, well over an hour on 2 busy cores; trimmed
# ~1,700, 47 min cold on 2 busy cores, docs/dev-cluster.md), with KEDA's own manifests (config/,
# the kustomize base tensorwasm.dev.autoscalers applies) beside them, cached under
# keda/<version>-<hash of the trim>. Not part of the default build: only the autoscaler tests and
# `tensorwasm dev autoscaler keda` need it.
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.0
CONTAINERD_VERSION=v2.4.2
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
PAUSE_IMAGE=tensorwasm.io/pause:3.10
KEDA_VERSION=v2.21.0  # its go.mod needs Go 1.26 and k8s.io v0.36: a separate module graph, its own lane
REGISTRY_VERSION=v3.0.0  # distribution's OCI registry: `make chart-publish` pushes the chart to it in tests

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
# containerd's zfs and devmapper snapshotters are left out (the node's config disables them; btrfs
# needs cgo, which is off): fewer packages to compile.
BUILD_TAGS=no_zfs,no_devmapper
# The compiler makes no DWARF (the linker's -w dropped it anyway) and inlines only in the standard
# library (runtime, maps, encoding, crypto keep their speed): 26% less compile CPU, for 4% more API
# server CPU on a fixed workload (median, inside its spread; flags_cpu.py, docs/dev-cluster.md).
GCFLAGS=("-gcflags=all=-dwarf=false -l" "-gcflags=std=-dwarf=false")
sources_hash="$( (cat "$here/go.mod" "$here/go.sum" "$here/cmd/tensorwasm-kube/main.go"; echo "$BUILD_TAGS ${GCFLAGS[*]}") | sha256sum | cut -c1-10)"
# The pause image has its own key: an edit of the archive writer rebuilds it, not the binaries.
pause_hash="$(cat "$repo/hack/node/pause/main.go" "$repo/hack/image/ociarchive.py" | sha256sum | cut -c1-10)"
cache_root="${TENSORWASM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tensorwasm}"
key="kube-$KUBE_VERSION-etcd-$ETCD_VERSION-containerd-$CONTAINERD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION-$sources_hash"
if [[ ${1:-} == keda || ${1:-} == keda-cached ]]; then
  key="../keda/keda-$KEDA_VERSION-$(sha256sum "$here/keda_scalers.py" | cut -c1-10)"
fi
if [[ ${1:-} == registry ]]; then
  key="../registry/registry-$REGISTRY_VERSION"
fi
bin="$cache_root/controlplane/$key/bin"
images="$cache_root/controlplane/$key/images"
mkdir -p "$bin" "$images"
# One build per cache directory at a time (two test sessions, make demo beside make test).
exec 9>"$bin/../.lock"
flock -n 9 || { echo "[controlplane] waiting for another build.sh on $bin" >&2; flock 9; }

KUBE_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy kwok containerd ctr)
# Main packages of other modules, built beside tensorwasm-kube by the same go build (go.mod `tool`).
OWN_BINARIES=(helm.sh/helm/v3/cmd/helm github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2)
export GOTOOLCHAIN=local CGO_ENABLED=0
# Cold-build seconds on an idle 2-core machine (projected from CPU time, docs/dev-cluster.md), shown
# before the package count gives a better estimate; a warm build is much faster. tensorwasm-kube is
# the one go build of everything: 3,578 packages, 1,657 CPU-s cold with the compiler's defaults,
# about 1,230 with GCFLAGS (26% less, measured side by side on client-go's packages).
declare -A COLD_S=([tensorwasm-kube]=615 [pause]=30 [keda]=2800 [registry]=600)

start=$(date +%s)
step() { printf '[controlplane %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }
fmt_min() { local s=$1; (( s < 0 )) && s=0; printf '%dm%02ds' $((s / 60)) $((s % 60)); }

# The binaries report these instead of v0.0.0 (kubectl version, /version, the node's kubelet version).
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

# go build -v names each package as it compiles it; counting those against the packages the build
# still has to compile (go list's Stale) gives the progress and the estimate of time left.
watch_progress() {  # watch_progress NAME TOTAL LOGFILE PID
  local name=$1 total=$2 log=$3 pid=$4 t0 done left
  t0=$(date +%s)
  while kill -0 "$pid" 2>/dev/null; do
    sleep 20
    kill -0 "$pid" 2>/dev/null || break
    done=$(grep -vc '^go: \|^#' "$log" 2>/dev/null || true)
    if (( done >= total && total > 0 )); then
      step "$name: linking (tensorwasm-kube, helm and the shim; a few minutes on a busy 2-core machine)"
    elif (( done > 0 )); then
      left=$(( ($(date +%s) - t0) * (total - done) / done ))
      step "$name: $done/$total packages compiled, about $(fmt_min "$left") left (then the links)"
    fi
  done
}

# The versions above are the key; go.mod is what builds. Refuse a key that would lie.
check_versions() {
  local mod ver mod_ver
  for mod_ver in "k8s.io/kubernetes $KUBE_VERSION" "go.etcd.io/etcd/server/v3 $ETCD_VERSION" \
      "github.com/containerd/containerd/v2 $CONTAINERD_VERSION" "sigs.k8s.io/kwok $KWOK_VERSION" \
      "helm.sh/helm/v3 $HELM_VERSION"; do
    read -r mod ver <<<"$mod_ver"
    if ! grep -Eq "^[[:space:]]+${mod//./\\.} ${ver//./\\.}( |$)" "$here/go.mod"; then
      echo "build.sh: hack/controlplane/go.mod does not require $mod $ver (build.sh's version, part of the cache key)" >&2
      return 1
    fi
  done
}

build_kube() {
  local log="$bin/../tensorwasm-kube.build.log" total pid tool built=1
  for tool in tensorwasm-kube "${OWN_BINARIES[@]##*/}"; do [[ -x $bin/$tool ]] || built=0; done
  if (( ! built )); then
    check_versions || return 1
    # The standard library needs no module: it compiles while go list downloads the modules (about
    # 3 minutes of network on a fresh machine, 1.0 GB), instead of after.
    step "tensorwasm-kube: fetching the modules (a fresh machine: about 3 min) while the standard library compiles"
    (cd "$here" && go build -trimpath "${GCFLAGS[@]}" std) &
    local std_pid=$!
    total=$(cd "$here" && go list -trimpath -tags "$BUILD_TAGS" "${GCFLAGS[@]}" -deps -f '{{if and .Stale (not .Standard)}}x{{end}}' ./cmd/tensorwasm-kube "${OWN_BINARIES[@]}" 2>/dev/null | grep -c x || true)
    step "tensorwasm-kube, helm, containerd-shim-runc-v2: one go build (${total} packages to compile; cold on 2 cores about $(fmt_min "${COLD_S[tensorwasm-kube]}"))"
    wait "$std_pid" || true  # not twice at once; a failure shows again in the build below
    mkdir -p "$bin/.partial"
    (cd "$here" && go build -v -trimpath -tags "$BUILD_TAGS" "${GCFLAGS[@]}" -ldflags "$kube_ldflags" -o "$bin/.partial/" ./cmd/tensorwasm-kube "${OWN_BINARIES[@]}") 2>"$log" &
    pid=$!
    watch_progress tensorwasm-kube "$total" "$log" "$pid" &
    local watcher=$!
    local rc=0; wait "$pid" || rc=$?
    kill "$watcher" 2>/dev/null || true  # it holds our stdout: a caller reading it waits for EOF
    if (( rc != 0 )); then grep -v '^[a-z0-9./_-]*$' "$log" >&2 || true; step "tensorwasm-kube: FAILED (log $log)"; return 1; fi
    # tensorwasm-kube last: it is the stamp of a finished build.
    for tool in "${OWN_BINARIES[@]##*/}" tensorwasm-kube; do mv "$bin/.partial/$tool" "$bin/$tool"; done
    rmdir "$bin/.partial"
    step "tensorwasm-kube, helm, containerd-shim-runc-v2: done"
  else
    step "tensorwasm-kube, helm, containerd-shim-runc-v2: cached"
  fi
  for name in "${KUBE_COMPONENTS[@]}"; do ln -sfn tensorwasm-kube "$bin/$name"; done
}

install() {  # install NAME MODULE@VERSION [MORE NAMES...]: one go install; NAME is the stamp checked
  local name=$1 mod=$2; shift 2
  if [[ -x "$bin/$name" ]]; then step "$name: cached"; return; fi
  step "$name: go install $mod (cold about $(fmt_min "${COLD_S[$name]:-60}"))"
  local gobin; gobin="$(mktemp -d)"
  # -p 1: this lane runs beside lane 1's compiles; two at once fill the two cores.
  GOBIN="$gobin" go install -p 1 -trimpath -ldflags "-s -w" "$mod" "$@"
  for f in "$gobin"/*; do mv "$f" "$bin/"; done
  rmdir "$gobin"
  step "$name: done"
}

build_pause_image() {
  local archive="$images/pause-$pause_hash.oci.tar"
  ln -sfn "pause-$pause_hash.oci.tar" "$images/pause.oci.tar"  # what `tensorwasm dev cluster up` imports
  if [[ -s $archive ]]; then step "pause image: cached"; return; fi
  local work; work="$(mktemp -d)"
  (cd "$repo/hack/node/pause" && go build -p 1 -trimpath -ldflags "-s -w" -o "$work/rootfs/pause" .)
  tar --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$work/rootfs" -cf "$work/layer.tar" pause
  python3 "$repo/hack/image/ociarchive.py" --name "$PAUSE_IMAGE" --layer "$work/layer.tar" \
    --entrypoint '["/pause"]' --out "$archive.partial" >/dev/null
  mv "$archive.partial" "$archive"
  rm -rf "$work"
  step "pause image: done ($PAUSE_IMAGE)"
}

kwok_stages() {  # kwok's stage definitions (node heartbeat, pods going Running) ship in its module zip.
  local stages="$bin/../kwok-stages" moddir s
  [[ -d $stages ]] && return
  moddir="$(cd "$here" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  mkdir -p "$stages.partial"
  for s in node-initialize node-heartbeat-with-lease pod-ready pod-complete pod-delete; do
    find "$moddir/kustomize/stage" -path "*/$s.yaml" -exec cp {} "$stages.partial/" \;
  done
  mv "$stages.partial" "$stages"
}

lane2() {
  build_pause_image
  kwok_stages
}

# Lane 3 (`build.sh keda`): KEDA's module has replace directives, so `go install mod@version` refuses
# it; a writable copy of its module directory (its own go.mod and go.sum) is trimmed and built, both
# commands in one `go build` so their shared packages compile once.
build_keda() {
  local log="$bin/../keda.build.log" src="$bin/../src" moddir total pid watcher rc=0
  if [[ -x "$bin/keda" && -x "$bin/keda-adapter" && -d "$bin/../config" ]]; then
    step "keda $KEDA_VERSION: cached"; return
  fi
  rm -rf "$src"
  cp -r "$(go mod download -json "github.com/kedacore/keda/v2@$KEDA_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')" "$src"
  chmod -R u+w "$src"
  python3 "$here/keda_scalers.py" "$src"
  moddir="$src"
  total=$(cd "$moddir" && go list -trimpath -deps -f '{{if .Stale}}x{{end}}' ./cmd/operator ./cmd/adapter 2>/dev/null | grep -c x || true)
  step "keda $KEDA_VERSION: building operator + adapter (${total} packages; cold on 2 cores about $(fmt_min "${COLD_S[keda]}"))"
  mkdir -p "$bin/.partial"
  (cd "$moddir" && go build -v -p 2 -trimpath \
    -ldflags "-s -w -X=github.com/kedacore/keda/v2/version.Version=$KEDA_VERSION" \
    -o "$bin/.partial/" ./cmd/operator ./cmd/adapter) 2>"$log" &
  pid=$!
  watch_progress keda "$total" "$log" "$pid" &
  watcher=$!
  wait "$pid" || rc=$?
  kill "$watcher" 2>/dev/null || true
  if (( rc != 0 )); then grep -v '^[a-z0-9./_-]*$' "$log" >&2 || true; step "keda: FAILED (log $log)"; return 1; fi
  rm -rf "$bin/../config"
  cp -r "$moddir/config" "$bin/../config" && chmod -R u+w "$bin/../config"
  mv "$bin/.partial/operator" "$bin/keda"
  mv "$bin/.partial/adapter" "$bin/keda-adapter"
  rmdir "$bin/.partial"
  rm -rf "$src"
  step "keda $KEDA_VERSION: done"
}

# `build.sh keda-cached`: the bin directory if KEDA is built, else exit 3 (tests skip rather than
# start an hour's build unasked).
if [[ ${1:-} == keda-cached ]]; then
  [[ -x "$bin/keda" && -x "$bin/keda-adapter" && -d "$bin/../config" ]] || exit 3
  echo "$bin"
  exit 0
fi
if [[ ${1:-} == keda ]]; then
  build_keda
  echo "$bin"
  exit 0
fi
# Lane 4 (`build.sh registry`): an OCI registry (distribution) for the chart-publish test; measured
# 10 minutes cold on the busy 2-core box (it links the Azure, GCS and S3 storage drivers too).
if [[ ${1:-} == registry ]]; then
  install registry "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  echo "$bin"
  exit 0
fi

lane2 &
lane2_pid=$!
kube_rc=0; build_kube || kube_rc=$?
lane2_rc=0; wait "$lane2_pid" || lane2_rc=$?
if (( kube_rc != 0 || lane2_rc != 0 )); then step "build failed"; exit 1; fi

step "binaries ready in $bin ($(fmt_min $(( $(date +%s) - start ))))"
echo "$bin"
