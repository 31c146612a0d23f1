"""Command-line helpers shared by every package's `cli.py` (no nanoseek imports: the bottom layer).

Flags that mirror a config dataclass are generated from it, so a field's type and default are
written once (in the dataclass) and `--help` shows that default:

    _FLAGS = {"group_size": dict(help="samples per prompt"),             # --group-size, type int
              "teachers": dict(flags=("--teacher",), action="append", required=True),
              "weights": dict(type=float_list, none="equal")}          # what a None default means
    add_config_flags(parser, RLConfig, _FLAGS)
    cfg = config_from_flags(RLConfig, parser.parse_args(), _FLAGS)

A table entry is add_argument's keywords plus `flags` (the spellings, the first canonical; default
`--field-name`, extra ones are kept aliases), `help` and `none`; `dest` is the field's name unless
the entry says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing

SCALAR_TYPES = {"int": int, "float": float, "str": str}


def show_defaults(p: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of the options whose default is a value (not None / off)
    and whose help does not state it already."""
    for act in p._actions:
        d = act.default
        if not act.option_strings or act.help == argparse.SUPPRESS or d is None or d is False \
                or d is argparse.SUPPRESS or "default" in (act.help or ""):
            continue
        act.help = f"{act.help} (default: %(default)s)" if act.help else "(default: %(default)s)"


def type_name(t) -> str:
    """'int' for `int`, `int | None` or the string annotations of `from __future__ import annotations`."""
    if not isinstance(t, str):
        t = " | ".join(getattr(x, "__name__", str(x)) for x in (typing.get_args(t) or (t,)))
    return t.replace(" | None", "").replace(" | NoneType", "").strip()


def field_default(f: dataclasses.Field):
    """The default of a dataclass field (default_factory called), None if it has none."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def shown_default(d, none: str = "none") -> str:
    """How --help writes a default: `none` for None, off/on for booleans, lists comma-separated."""
    if d is None:
        return none
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, (list, tuple)):
        return ",".join(str(x) for x in d) or "none"
    return str(d)


def float_list(s: str) -> list[float]:
    """argparse type of a comma-separated list of numbers ("0.7,0.3")."""
    try:
        return [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give numbers separated by commas") from None


def int_at_least(lo: int, hi: int | None = None):
    """argparse type: an integer >= lo (and <= hi), else a one-line usage error naming the flag."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi, False, False)}, got {v}")
        return v

    parse.__name__ = "int"
    return parse


def number_in(lo: float, hi: float | None = None, open_lo: bool = False, open_hi: bool = False):
    """argparse type: a finite number >= lo (> lo where open_lo; and <= / < hi), else a one-line
    usage error naming the flag."""
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
        low_ok = v > lo if open_lo else v >= lo
        high_ok = hi is None or (v < hi if open_hi else v <= hi)
        if not (math.isfinite(v) and low_ok and high_ok):
            raise argparse.ArgumentTypeError(f"must be a finite number {_bounds(lo, hi, open_lo, open_hi)}, got {s}")
        return v

    parse.__name__ = "float"
    return parse


def _bounds(lo, hi, open_lo: bool, open_hi: bool) -> str:
    low = f"{'>' if open_lo else '>='} {lo:g}"
    return low if hi is None else f"{low} and {'<' if open_hi else '<='} {hi:g}"


def add_config_flags(p, cls, table: dict[str, dict]) -> None:
    """`--field-name` flags for the fields of dataclass `cls` named in `table` (help, choices, flags,
    `none`: what a None default means); argparse defaults are the dataclass defaults, shown in --help
    (except for required flags)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, spec in table.items():
        f = fields[name]
        d = field_default(f)
        kw = {k: v for k, v in spec.items() if k not in ("flags", "none", "help")}
        kw.setdefault("dest", name)
        kw.setdefault("default", d)
        base = type_name(f.type)
        if base == "bool":
            kw.setdefault("action", "store_true")
        elif "action" not in kw and "type" not in kw:
            kw["type"] = SCALAR_TYPES[base]
        text = spec.get("help", "")
        if not kw.get("required"):
            text = f"{text} (default: {shown_default(d, spec.get('none', 'none'))})".strip()
        kw["help"] = text.replace("%", "%%")
        p.add_argument(*(spec.get("flags") or ("--" + name.replace("_", "-"),)), **kw)


def config_from_flags(cls, args: argparse.Namespace, table: dict[str, dict], **override):
    """The dataclass `cls` from the flags add_config_flags added (fields not in `table` keep their
    defaults; `override` replaces values, e.g. a default that depends on other flags)."""
    kw = {name: getattr(args, spec.get("dest", name)) for name, spec in table.items()}
    kw.update(override)
    return cls(**kw)
