"""`tensorwasm runtime ...`: run one runtime shard in this process.

Owns the subcommand only; the flags are the runtime's own (tensorwasm.runtime.settings registers
them here too, so `tensorwasm runtime --help` and `python -m tensorwasm.runtime --help` agree).
The runtime itself is imported when the command runs, so the CLI works with only the base install.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    from tensorwasm.runtime import settings  # stdlib-only module: cheap at CLI start

    parser = subparsers.add_parser(
        "runtime",
        help="run a runtime shard (tenants from --tenants-file or from Kubernetes)",
        description="Run a TensorWasm runtime shard: many tenants' wasm functions behind one HTTP API.",
    )
    settings.add_arguments(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tensorwasm.runtime.__main__ import EXIT_SETTINGS, run_settings
    from tensorwasm.runtime.settings import SettingsError, settings_from_namespace

    try:
        settings = settings_from_namespace(args, os.environ)
    except SettingsError as exc:
        print(f"tensorwasm runtime: {exc}", file=sys.stderr)
        return EXIT_SETTINGS
    return run_settings(settings)
