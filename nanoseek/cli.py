"""The `nanoseek` command line: thin argument parsing over importable functions.

Run `nanoseek --help` for the list of subcommands. Each subsystem keeps its own subcommands next
to its code (a module with an `add_subcommands(subparsers)` function listed in `_COMMAND_MODULES`),
so this file stays a table of contents and no subcommand pulls in the dependencies of another
(e.g. `nanoseek info` never imports the data pipeline or the server).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands. Each defines `add_subcommands(subparsers)` and sets
# `func` on the parsers it adds; the function receives the parsed `argparse.Namespace`.
_COMMAND_MODULES = (
    "nanoseek.model.info",
    "nanoseek.eval.cli",
    "nanoseek.data.cli",
    "nanoseek.demo",
    "nanoseek.train.cli",
    "nanoseek.engine.cli",
    "nanoseek.serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="nanoseek: train, evaluate and serve DeepSeek-V4-architecture code models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
