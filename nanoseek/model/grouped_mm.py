"""Many independent matrix products of different shapes as one grouped GEMM call (the routed
experts: each expert's rows times that expert's own matrices).

    from nanoseek.model.grouped_mm import mm_many
    mm_many([(x[a:b], w1[e].t(), gate[a:b]) for e, (a, b) in slices])      # out_i = a_i @ b_i
    mm_many(products, accumulate=True)                                       # out_i += a_i @ b_i
    grouped_mm.enabled = False        # every product through torch.mm (the A/B switch)

Why: a 512-token prefill of `small` gives each of 16 experts ~64 rows, and MKL runs such
[64, 512] x [512, 256] products one by one at ~60% of its large-GEMM rate: each call splits one
small product over the threads and synchronises them. PyTorch's CPU build carries MKL, whose
`cblas_sgemm_batch` takes a whole group of products of different shapes at once and spreads the
products, not their pieces, over the threads. The sums are MKL's own: a prefill's expert products
came out bit for bit as torch.mm's, while a product torch.mm splits over threads or takes as a
matrix-vector one (a single row) can round differently, within fp32 rounding
(tests/model/test_grouped_mm.py: every layout against float64). One layer's routed experts in a
`small` prefill: 8.0 -> 6.9 ms; a 512-token prefill 1.02-1.11x (docs/model.md).
(`torch._grouped_mm` on a CPU is a loop of the same per-product calls: no faster.)

Where it does not apply, the products run through torch.mm one by one, with the same results
as before: a dtype other than float32 (bf16 goes to oneDNN, float64 tests the formulas), a
tensor off the CPU, an output that is not row-major, an operand that is neither row-major nor
a transposed row-major matrix, or a torch without MKL's symbol (checked once, with a self-test
against torch.mm: a mismatch, e.g. a 64-bit-integer MKL interface, disables the path).
"""

from __future__ import annotations

import ctypes
import os
from typing import Sequence

import torch

enabled = True  # False: a loop of torch.mm (the plain path, and the benchmark switch)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_batch_fn = None      # MKL's cblas_sgemm_batch once found and self-tested; False: not available
_MIN_PRODUCTS = 2     # one product: torch.mm is as good
_MIN_ROWS = 16        # mean output rows a product: decode-sized ones (a few rows) stay on torch.mm,
                      # where nothing is gained and torch.mm takes its matrix-vector kernels


def mm_many(products: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], accumulate: bool = False) -> None:
    """out = a @ b (or out += a @ b with `accumulate`) for every (a, b, out) of `products`:
    2-D tensors, products independent of each other (no output is another product's operand).
    Empty products are skipped; a product over k = 0 is zeros (or leaves `out` as it is)."""
    work = []
    for a, b, out in products:
        if out.numel() and a.shape[1] == 0:  # k = 0: a sum of nothing (MKL would leave C as it is)
            if not accumulate:
                out.zero_()
        elif out.numel():
            work.append((a, b, out))
    big = len(work) >= _MIN_PRODUCTS and sum(c.shape[0] for _, _, c in work) >= _MIN_ROWS * len(work)
    layouts = _layouts(work) if enabled and big else None
    if layouts is None or not _available():
        for a, b, out in work:
            if accumulate:
                out.addmm_(a, b)
            else:
                torch.mm(a, b, out=out)
        return
    _call(work, layouts, 1.0 if accumulate else 0.0)


def _layouts(work) -> list | None:
    """[(trans_a, lda, trans_b, ldb, ldc)] for MKL's row-major interface, or None where a tensor
    does not qualify (then every product takes torch.mm)."""
    out = []
    for a, b, c in work:
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 for t in (a, b, c)):
            return None
        la, lb = _operand(a), _operand(b)
        if la is None or lb is None or c.stride(1) != 1 or c.stride(0) < max(1, c.shape[1]):
            return None
        out.append((*la, *lb, c.stride(0)))
    return out


def _operand(t: torch.Tensor) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a matrix stored row-major (NoTrans) or as the
    transposed view of a row-major matrix (Trans); None for any other layout."""
    rows, cols = t.shape
    if t.stride(1) == 1 and (rows == 1 or t.stride(0) >= max(1, cols)):
        return _NO_TRANS, max(t.stride(0), cols, 1)
    if t.stride(0) == 1 and (cols == 1 or t.stride(1) >= max(1, rows)):
        return _TRANS, max(t.stride(1), rows, 1)
    return None


def _call(work, layouts, beta: float, fn=None) -> None:
    """One cblas_sgemm_batch call with one group per product (MKL_INT: 32-bit, the LP64
    interface PyTorch links)."""
    n = len(work)
    i32, f32, ptr = ctypes.c_int32 * n, ctypes.c_float * n, ctypes.c_void_p * n
    (fn or _batch_fn)(
        ctypes.c_int32(_ROW_MAJOR),
        i32(*(lay[0] for lay in layouts)), i32(*(lay[2] for lay in layouts)),
        i32(*(c.shape[0] for _, _, c in work)), i32(*(c.shape[1] for _, _, c in work)),
        i32(*(a.shape[1] for a, _, _ in work)),
        f32(*([1.0] * n)), ptr(*(a.data_ptr() for a, _, _ in work)), i32(*(lay[1] for lay in layouts)),
        ptr(*(b.data_ptr() for _, b, _ in work)), i32(*(lay[3] for lay in layouts)),
        f32(*([beta] * n)), ptr(*(c.data_ptr() for _, _, c in work)), i32(*(lay[4] for lay in layouts)),
        ctypes.c_int32(n), i32(*([1] * n)),
    )


def _available() -> bool:
    """Whether MKL's grouped GEMM can be called here (found once, then self-tested)."""
    global _batch_fn
    if _batch_fn is None:
        _batch_fn = _find() or False
        if _batch_fn and not _self_test(_batch_fn):
            _batch_fn = False
    return bool(_batch_fn)


def _find():
    if not torch.backends.mkl.is_available():
        return None
    try:  # the library is already loaded: this only looks the symbol up
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


def _self_test(fn) -> bool:
    """The batch call on three small products of every layout equals torch.mm; anything else
    (another integer width, a changed ABI) turns the path off rather than compute garbage."""
    g = torch.Generator().manual_seed(0)
    a, b, x = (torch.randn(*shape, generator=g) for shape in ((5, 7), (6, 7), (3, 5)))
    work = [(a, b.t(), torch.empty(5, 6)), (x.t(), x[:, :4], torch.empty(5, 4)), (x, a, torch.empty(3, 7))]
    try:
        _call(work, _layouts(work), 0.0, fn)
    except Exception:  # noqa: BLE001 -- any failure means: not usable here
        return False
    return all(torch.equal(c, torch.mm(p, q)) for p, q, c in work)
