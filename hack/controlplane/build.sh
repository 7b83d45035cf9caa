#!/usr/bin/env bash
# Builds the local control plane once into a cache outside the repo, keyed by version.
# Prints the bin directory on the last line of stdout. Progress goes to stderr.
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.0
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${TENSORWASM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tensorwasm}"
bin="$cache_root/controlplane/kube-$KUBE_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION/bin"
mkdir -p "$bin"

export GOTOOLCHAIN=local CGO_ENABLED=0

# The binaries report these instead of v0.0.0 (kubectl version, /version).
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=37"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

start=$(date +%s)
step() { printf '[controlplane %4ss] %s\n' "$(( $(date +%s) - start ))" "$*" >&2; }

build() {  # build NAME PACKAGE
  local name=$1 pkg=$2
  if [[ -x "$bin/$name" ]]; then step "$name: cached"; return; fi
  step "$name: building $pkg (first build takes minutes on 2 cores)"
  (cd "$here" && go build -trimpath -ldflags "$ldflags" -o "$bin/$name.partial" "$pkg")
  mv "$bin/$name.partial" "$bin/$name"
  step "$name: done"
}

install() {  # install NAME MODULE@VERSION
  local name=$1 mod=$2
  if [[ -x "$bin/$name" ]]; then step "$name: cached"; return; fi
  step "$name: go install $mod"
  local gobin; gobin="$(mktemp -d)"
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "$mod"
  mv "$gobin/$name" "$bin/$name"; rmdir "$gobin"
  step "$name: done"
}

build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
build kubectl k8s.io/kubernetes/cmd/kubectl
install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"

# kwok's stage definitions (node heartbeat, pods going Running) ship in its module zip.
stages="$bin/../kwok-stages"
if [[ ! -d "$stages" ]]; then
  moddir="$(cd "$here" && go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
  mkdir -p "$stages.partial"
  for s in node-initialize node-heartbeat-with-lease pod-ready pod-complete pod-delete; do
    find "$moddir/kustomize/stage" -path "*/$s.yaml" -exec cp {} "$stages.partial/" \;
  done
  mv "$stages.partial" "$stages"
fi

step "control plane ready in $bin"
echo "$bin"
