#!/usr/bin/env bash
# Builds the unchanged Containerfile with Debian's buildah (a builder that is not ours) and compares
# the result with `make image`'s: image config and file tree. No registry is reachable here, so
# buildah gets `debian:bookworm-slim` from the base layer make image already made (run make image
# first). RUN steps get the host's CA bundle through a pip.conf volume (this network's TLS proxy).
# Root; about 2-3 minutes; leaves nothing behind (buildah's storage lives in a temporary dir).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
command -v buildah >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends buildah
work="$(mktemp -d)"
B=(buildah --root "$work/root" --runroot "$work/run" --storage-driver overlay)
cleanup() { "${B[@]}" rm --all >/dev/null 2>&1 || true; "${B[@]}" rmi --all --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

cache="$(python3 "$repo/hack/image/build.py" --print-cache)"
archive="$(python3 "$repo/hack/image/build.py" --keep-rootfs | sed -n 's/^archive: *//p')"
base="$(python3 - "$repo" <<'EOF'
import sys; sys.path.insert(0, sys.argv[1] + "/hack/image")
import build, debianbase
print(build._key("debian-slim", build.BUILDER_VERSION, *debianbase.recipe_parts("bookworm")))
EOF
)"
tar -C "$cache/layers/$base/diff" --numeric-owner --sort=name -cf "$work/base.tar" .
python3 "$repo/hack/image/ociarchive.py" --name docker.io/library/debian:bookworm-slim --layer "$work/base.tar" \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["bash"]' \
  --compression none --out "$work/base.oci.tar" >/dev/null
"${B[@]}" pull -q "oci-archive:$work/base.oci.tar" >/dev/null
printf '[global]\ncert = /run/host-ca.crt\n' >"$work/pip.conf"
start=$(date +%s)
"${B[@]}" bud -q --isolation chroot --pull-never -f "$repo/Containerfile" -t tensorwasm.io/tensorwasm:buildah \
  -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro -v "$work/pip.conf:/etc/pip.conf:ro" "$repo" >/dev/null
echo "buildah bud: $(( $(date +%s) - start )) s"

fields='["User","Env","Entrypoint","Cmd","WorkingDir"]'
ours="$(python3 -c "import sys,json; sys.path.insert(0,'$repo/hack/image'); import ociarchive, pathlib
c=ociarchive.read_archive(pathlib.Path('$archive')).config['config']; print(json.dumps({k:c.get(k) for k in $fields}))")"
theirs="$("${B[@]}" inspect --type image tensorwasm.io/tensorwasm:buildah | python3 -c "import sys,json
c=json.load(sys.stdin)['OCIv1']['config']; print(json.dumps({k:c.get(k) for k in $fields}))")"
[[ "$ours" == "$theirs" ]] && echo "config: same ($ours)" || { echo "config differs:"; echo " make image: $ours"; echo " buildah:    $theirs"; }

container="$("${B[@]}" from tensorwasm.io/tensorwasm:buildah)"
mnt="$("${B[@]}" mount "$container")"
(cd "$mnt" && find . | sort) >"$work/buildah.list"
tar -tf "$cache/rootfs.tar" | sed 's#/$##' | sort >"$work/ours.list"
# Expected: buildah's own /etc/hosts and the mount points of the two volumes above.
echo "paths: make image $(wc -l <"$work/ours.list"), buildah $(wc -l <"$work/buildah.list"); differences:"
{ diff "$work/ours.list" "$work/buildah.list" || true; } | grep '^[<>]' || echo "  none"
"${B[@]}" umount "$container" >/dev/null
