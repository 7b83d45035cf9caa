#!/usr/bin/env bash
# Prints the `device` calls that bring the GPU node up on the GPU machine (after hack/gpunode/pack.sh).
# Each call carries one part; issue them back to back (the machine keeps /var/tmp only while warm,
# about 30 s after a call). The last one also carries the wheels (.whl: wasmtime, zstandard; see
# bench/README.md), unpacks, starts the node, installs the chart and runs hack/gpunode/gpunode.py.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${GPU_NODE_PAYLOAD_DIR:-$REPO/.gpunode}
parts=$(cd "$DIR" && ls part-* | sort)
last=$(tail -1 <<<"$parts")
site='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site'
echo "# GPU node: $(wc -w <<<"$parts") device calls, back to back (kind nvidia-h200), timeout_s 600"
n=0
for part in $parts; do
  n=$((n + 1))
  if [[ $part == "$last" ]]; then
    echo "run ($n) carry=[\".gpunode/$part\", \".gpunode/SHA256SUMS\", \".whl\"] command:"
    echo "  $site && bash hack/gpunode/node-host.sh receive && bash hack/gpunode/node-host.sh unpack && PYTHONUNBUFFERED=1 timeout 540 python3 hack/gpunode/gpunode.py all"
  else
    echo "run ($n) carry=[\".gpunode/$part\", \".gpunode/SHA256SUMS\"] command:"
    echo "  bash hack/gpunode/node-host.sh receive"
  fi
done
echo "# Results: \$OUT/gpunode.json (every figure as measured) and \$OUT/diagnostics.log."
echo "# A later call while the machine is warm can rerun steps: TW_GPUNODE_STEPS=\"checks pod\" ... gpunode.py all"
