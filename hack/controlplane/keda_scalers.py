"""Trims a writable copy of KEDA's module to the scalers the dev cluster uses, before build.sh compiles it.

KEDA's scalers live in one Go package (pkg/scalers) that imports every scaler's SDK: Elasticsearch's
typed API alone is ~960 packages, and the whole operator ~3,450, well over an hour on two busy cores.
The chart's ScaledObject uses the `prometheus` trigger; this keeps that one plus `cpu` and `memory`
(KEDA's own, no SDK), deletes the other scalers' files from pkg/scalers and their cases from the
trigger switch in pkg/scaling/scalers_builder.go (an unknown trigger type then gets KEDA's own
"no scaler found for type" error). Everything else (controllers, the metrics server, the HPA KEDA
makes, certificates) is KEDA's code unchanged. Fails loudly when the source no longer has the shape
this expects, so a KEDA upgrade cannot silently build something else.

usage: keda_scalers.py MODULE_DIR [TRIGGER...]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

KEEP_TRIGGERS = ("prometheus", "cpu", "memory")
KEEP_FILES = {"scaler.go", "prometheus_scaler.go", "cpu_memory_scaler.go"}
# Declared in a removed scaler's file and used by a kept one (v2.21.0: azure_queue_scaler.go).
SHARED_DECLARATIONS = "\n".join([
    "package scalers",
    "",
    "// Written by hack/controlplane/keda_scalers.py.",
    'const externalMetricType = "External"',
    "",
])  # fmt: skip


def trim_switch(source: str, keep: tuple[str, ...]) -> str:
    """Drop every `case "x":` (and its body) between TRIGGERS-START and TRIGGERS-END not in `keep`."""
    start, end = source.index("// TRIGGERS-START"), source.index("// TRIGGERS-END")
    block = source[start:end]
    cases = re.split(r'(?m)^(?=\tcase "|\tdefault:)', block)
    kept = [c for c in cases if not c.startswith("\tcase ") or re.match(rf'\tcase "({"|".join(keep)})":', c)]
    found = {m for c in cases for m in re.findall(r'^\tcase "([^"]+)":', c)}
    missing = set(keep) - found
    if missing or "\tdefault:" not in block:
        raise SystemExit(f"keda_scalers: the trigger switch changed shape (missing {sorted(missing)})")
    return source[:start] + "".join(kept) + source[end:]


def main(argv: list[str]) -> int:
    module = Path(argv[1])
    keep = tuple(argv[2:]) or KEEP_TRIGGERS
    builder = module / "pkg" / "scaling" / "scalers_builder.go"
    builder.write_text(trim_switch(builder.read_text(), keep))
    scalers = module / "pkg" / "scalers"
    if not {p.name for p in scalers.glob("*.go")} >= KEEP_FILES:
        raise SystemExit(f"keda_scalers: {scalers} no longer has {sorted(KEEP_FILES)}")
    removed = 0
    for path in scalers.glob("*.go"):
        if path.name not in KEEP_FILES:  # other scalers, their tests and the test mocks
            path.unlink()
            removed += 1
    (scalers / "trimmed_shared.go").write_text(SHARED_DECLARATIONS)
    print(
        f"keda_scalers: kept triggers {list(keep)}, removed {removed} files from pkg/scalers", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
