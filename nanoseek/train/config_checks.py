"""Range checks for the trainer's settings dataclasses (TrainConfig, SFTConfig, RLConfig,
DistillConfig): every out-of-range value named in one ValueError, before a run builds anything.

    from nanoseek.train.config_checks import check_ranges, INT, FLOAT
    check_ranges(cfg, "TrainConfig", {"micro_batch": INT(1)}, {"fim_rate": FLOAT(0, 1)}, {"device": ("cpu", "cuda")})

Why: a zero micro-batch or log interval surfaced as a ZeroDivisionError halfway through set-up,
a negative sequence length as a KeyError, and a NaN loss weight as a diverging run; a user's
typo deserves a line that names the setting and what it accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class INT:
    """An int >= lo (and <= hi), or None where `optional`."""

    lo: int
    hi: int | None = None
    optional: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        return isinstance(v, int) and not isinstance(v, bool) and v >= self.lo and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        rule = f"an int >= {self.lo}" if self.hi is None else f"an int in [{self.lo}, {self.hi}]"
        return rule + (" or None" if self.optional else "")


@dataclass(frozen=True)
class FLOAT:
    """A finite number >= lo (and <= hi; > lo where `open_lo`), or None where `optional`."""

    lo: float
    hi: float | None = None
    optional: bool = False
    open_lo: bool = False

    def ok(self, v) -> bool:
        if v is None:
            return self.optional
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        return (v > self.lo if self.open_lo else v >= self.lo) and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        low = f"> {self.lo:g}" if self.open_lo else f">= {self.lo:g}"
        rule = f"a finite number {low}" + (f" and <= {self.hi:g}" if self.hi is not None else "")
        return rule + (" or None" if self.optional else "")


def check_ranges(cfg, name: str, ints: dict[str, INT] | None = None, floats: dict[str, FLOAT] | None = None,
                 choices: dict[str, tuple] | None = None) -> None:
    """ValueError("invalid NAME: field=value (rule); ...") naming every field of `cfg` that breaks
    its rule; nothing when all hold."""
    rules = {**(ints or {}), **(floats or {})}
    bad = [f"{f}={getattr(cfg, f)!r} ({rule})" for f, rule in rules.items() if not rule.ok(getattr(cfg, f))]
    bad += [f"{f}={getattr(cfg, f)!r} (one of {', '.join(map(str, allowed))})"
            for f, allowed in (choices or {}).items() if getattr(cfg, f) not in allowed]
    if bad:
        raise ValueError(f"invalid {name}: " + "; ".join(bad))
