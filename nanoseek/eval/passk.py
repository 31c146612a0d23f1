"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1).

With n samples of which c pass, the probability that at least one of k samples drawn without
replacement passes is  pass@k = 1 - C(n-c, k) / C(n, k).  Binomial coefficients overflow
quickly, so we use the equivalent product  1 - prod_{i=n-c+1}^{n} (1 - k/i),  exact in floating
point for the sizes used in practice.

    >>> pass_at_k(10, 3, 1)
    0.3
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with n samples, c correct."""
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n} c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got k={k} n={n}")
    if n - c < k:  # every size-k draw contains a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(ns: Sequence[int], cs: Sequence[int], k: int) -> float:
    """Average pass@k over problems (each with its own n and c)."""
    if len(ns) != len(cs):
        raise ValueError("ns and cs differ in length")
    if not ns:
        raise ValueError("no problems")
    return float(np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(ns, cs)]))


def pass_at_ks(ns: Sequence[int], cs: Sequence[int],
               ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """pass@k for every k that all problems have enough samples for (as the reference harness
    does: a k larger than some problem's n is left out rather than estimated)."""
    n_min = min(int(n) for n in ns)
    return {f"pass@{k}": mean_pass_at_k(ns, cs, k) for k in ks if k <= n_min}
