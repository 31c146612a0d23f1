"""Command-line helpers shared by every package's `cli.py` (no nanoseek imports: the bottom layer)."""

from __future__ import annotations

import argparse


def show_defaults(p: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of the options whose default is a value (not None / off)
    and whose help does not state it already."""
    for act in p._actions:
        d = act.default
        if not act.option_strings or act.help == argparse.SUPPRESS or d is None or d is False \
                or d is argparse.SUPPRESS or "default" in (act.help or ""):
            continue
        act.help = f"{act.help} (default: %(default)s)" if act.help else "(default: %(default)s)"
