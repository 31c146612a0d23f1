"""The `nanoseek` command line: thin argument parsing over importable functions.

Run `nanoseek --help` for the list of subcommands. Each subsystem keeps its own subcommands next
to its code (a module with an `add_subcommands(subparsers)` function listed in `_COMMAND_MODULES`),
so this file stays a table of contents and no subcommand pulls in the dependencies of another
(e.g. `nanoseek info` never imports the data pipeline or the server).

One error path: a user error (missing file, bad value, missing optional dependency) prints one
line and exits 2 (`NANOSEEK_DEBUG=1` shows the traceback); `nanoseek --version`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from nanoseek import _extras

_python_format_warning = warnings.formatwarning

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
    from nanoseek import __version__

    parser = argparse.ArgumentParser(
        prog="nanoseek",
        description="nanoseek: train, evaluate and serve DeepSeek-V4-architecture code models.",
    )
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_subcommands(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """nanoseek's own warnings as one "nanoseek: warning: ..." line (no file and source line, which
    mean nothing to a command-line user); others as Python formats them."""
    if category is UserWarning and f"{os.sep}nanoseek{os.sep}" in filename:
        return f"nanoseek: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        code = _run(args)
    finally:  # (main called in-process, e.g. by tests, leaves Python's format as it was)
        warnings.formatwarning = previous
    if argv is None:  # the program's own command line (not an in-process call): a torchrun rank
        # whose command tore down its group ends here, without interpreter finalization
        # (train/parallelize.py exit_after_distributed); looked up, not imported: torch-free commands
        dist = sys.modules.get("nanoseek.train.parallelize")
        if dist is not None:
            dist.exit_after_distributed(code)
    return code


def _run(args) -> int:
    """The subcommand, with user errors as one line (exit 2) and Ctrl-C as exit 130."""
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:          # an optional dependency: one line naming the extra
        msg = _extras.explain(e)
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            ValueError) as e:
        # a user error (a missing file, a bad value): one line, no traceback, unless debugging
        if os.environ.get("NANOSEEK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
