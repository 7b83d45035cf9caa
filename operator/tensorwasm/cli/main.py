"""The `tensorwasm` console command: one subcommand per module in this package.

Each command module exposes `register(subparsers)` which adds its parser and sets
`handler=<callable(args) -> int>`. Command modules import their heavy dependencies
lazily so `tensorwasm --help` stays fast and works with only the base install.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from collections.abc import Sequence

# Order here is the order in `tensorwasm --help`.
COMMAND_MODULES = (
    "tensorwasm.cli.dev",
    "tensorwasm.cli.operator",
    "tensorwasm.cli.runtime",
    "tensorwasm.cli.plan",
    "tensorwasm.cli.snapshot",
    "tensorwasm.cli.tenant",
    "tensorwasm.cli.invoke",
    "tensorwasm.cli.selftest",
)


def build_parser(prog: str = "tensorwasm") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run many tenants' WebAssembly functions on shared GPUs, on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {distribution_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def distribution_version() -> str:
    """The installed distribution's version (pyproject.toml), or "unknown" from a bare source tree."""
    try:
        return importlib.metadata.version("tensorwasm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None, prog: str = "tensorwasm") -> int:
    args = build_parser(prog).parse_args(argv)
    result: int = args.handler(args)
    return result


def plugin_main() -> int:
    """`kubectl tensorwasm ...`: kubectl runs the `kubectl-tensorwasm` executable on PATH."""
    return main(prog="kubectl tensorwasm")


if __name__ == "__main__":
    sys.exit(main())
