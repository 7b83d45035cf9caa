"""Writes helm/tensorwasm/README.md (what `helm show readme` prints) from values.yaml's `# --` comments.

Owns the chart README only: a fixed introduction (hack/chart-readme-intro.md) and one table row per
value, its default from values.yaml and its description from the `# -- ...` comment above it
(continued by the `#` lines that follow). `--check` exits 1 when the committed README is stale;
tests/unit/test_chart_readme.py runs it. Stdlib + PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "tensorwasm"
INTRO = Path(__file__).with_name("chart-readme-intro.md")
KEY = re.compile(r"^(\s*)([A-Za-z0-9_]+):")


def documented_keys(values_text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for each key that a `# --` comment describes, in file order."""
    rows: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped.removeprefix("# --").strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped.lstrip("#").strip())
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, key))
        if pending is not None:
            rows.append((".".join(k for _, k in path), " ".join(pending)))
            pending = None
    return rows


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def render(values_text: str, intro: str) -> str:
    values = yaml.safe_load(values_text)
    lines = [intro.rstrip(), "", "## Values", "", "| value | default | description |", "|---|---|---|"]
    for key, text in documented_keys(values_text):
        default = json.dumps(lookup(values, key), separators=(", ", ": "))
        if len(default) > 60:
            default = "see values.yaml"
        cell = text.replace("|", "\\|")
        lines.append(f"| `{key}` | `{default}` | {cell} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not current")
    args = parser.parse_args(argv)
    text = render((CHART / "values.yaml").read_text(), INTRO.read_text())
    target = CHART / "README.md"
    if args.check:
        if not target.is_file() or target.read_text() != text:
            print(f"{target.relative_to(REPO)} is stale: run `make chart-readme`", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
