"""C kernels for the eager CPU paths: built on first use with the system C compiler, loaded with
ctypes, and used where they apply; everywhere else the PyTorch code runs.

    from nanoseek.model import cpu_kernels
    cpu_kernels.available()                 # True once kernels/kernels.c is built (or found cached)
    out = cpu_kernels.sinkhorn(logits, 20, 1e-6)           # [..., n, n] fp32/fp64 CPU tensors
    dlogits = cpu_kernels.sinkhorn_backward(logits, grad, 20, 1e-6)
    y = cpu_kernels.swiglu(gate, up, 10.0)                 # silu(min(g, L)) * clamp(u, -L, L); fp32/64, bf16
    dgate, dup = cpu_kernels.swiglu_backward(gate, up, grad, 10.0)
    lse, target = cpu_kernels.cross_entropy_rows(logits, labels, weight)   # logits -> d CE / d logits
    lse = cpu_kernels.attn_softmax(scores, mask, sink, heads, scale)      # bf16 scores -> probabilities
    cpu_kernels.attn_softmax_backward(dp, p, delta, scale)                 # dp -> d loss / d scores
    y, r = cpu_kernels.rms_norm(x, weight, eps)            # x / rms(x) * weight (None: unweighted)
    gx, gw = cpu_kernels.rms_norm_backward(x, r, weight, grad)
    out = cpu_kernels.stream_mix(y, streams, post, comb)    # mHC's expand, [..., n, d] streams
    gy, gx, gpost, gcomb = cpu_kernels.stream_mix_backward(y, streams, post, comb, grad)
    x = cpu_kernels.weighted_sum(w, streams)                # sum_j w_j X_j
    gw, gx = cpu_kernels.weighted_sum_backward(w, streams, grad)
    gx = cpu_kernels.collapse_backward(w, streams, grad, coef)   # w_j g + coef X_j
    raw, ss = cpu_kernels.mix_rms(flat, fn)                 # flat @ fn^T and the rows' sums of squares
    gx, gfn = cpu_kernels.collapse_mix_backward(w, streams, grad, coef, g_mix, fn, extra)

Why: some of the model's arithmetic is many tiny PyTorch ops whose dispatch costs more than
their work on a CPU.
  * mHC's Sinkhorn projection (spec 1.2, kernels/sinkhorn.h): 2 * 20 - 1 normalisations of a
    4 x 4 matrix per token, ~120 ops forward and ~200 backward per mHC site: ~1.3 ms a site at
    1,024 tokens, 12.6 ms of a ~220 ms speedrun micro-step. One C call per direction: ~0.2 ms.
  * the experts' clamped SwiGLU (spec 1.6, kernels/swiglu.h): 4 ops forward and ~10 backward
    per expert and layer, on tensors of a few hundred rows. One pass each way, also for bf16
    tensors (autocast's activations: computed in fp32, rounded once).
  * mHC's stream arithmetic (spec 1.2, kernels/mhc.h): the expand (a per-token 4 x 4 mix of the
    streams plus the block output) and the weighted sum that collapses them, and their
    gradients. In PyTorch each product is a pass over the 4x-wide streams (16 MiB per site of a
    `small` step; the expand's backward is five passes and two temporaries of that size); here
    one pass each way. Also for bf16 streams (bf16 autocast's, Transformer.autocast_streams):
    the per-token weights, fn and the arithmetic stay fp32, each streams-sized result is rounded
    to bf16 once, and every pass moves half the bytes.
  * the head's cross-entropy (model/loss.py, kernels/ce.h): per chunk of logits, the log-softmax,
    the target logit and the gradient (softmax - one-hot) were nine passes over [512, 8192] (a
    `small` chunk; with bf16 logits two of them casts). One call: each row read twice and its
    gradient written once, over the logits.
  * the sink softmax of the folded bf16 attention (model/attention.py _BmmSinkAttention,
    kernels/attn.h): scale, mask, max, exp, sum and divide over [blocks, rows, keys] bf16 scores
    between its batched products, and the backward's p (dp - delta) scale. One pass each.
  * RMSNorm (model/norm.py, kernels/norm.h): 5 passes forward and ~8 backward per norm in
    PyTorch's autograd Function, with bf16 input copied to fp32 and xhat saved in fp32; one
    call each way, x saved in its own dtype. A [4, 512, 512] fp32 norm's forward + backward
    ~4 -> ~1.3 ms; the four kinds of norm of a bf16 `small` step ~40 -> ~18 ms.
  * mHC's mix products (spec 1.2, kernels/mhc.h): [T, 4d] x [4d, 24] in fp32, whose narrow side
    MKL ran at ~45% of the fp32 peak, plus a norm pass forward, and backward two GEMMs, the
    collapse pass and autograd's add of the expand's streams gradient. One register-blocked
    pass each way (1.1 vs 1.75 ms forward at `small`; a site's forward + backward 33.5 -> 30 ms).
Each kernel splits its tokens (elements) across PyTorch's OpenMP threads, as PyTorch's own ops
do, so that it scales with the cores; each token is computed whole by one thread, so the results
do not depend on the thread count.
The callers (hyper_connections._SinkhornKernel, _StreamMix, _WeightedSum, moe._SwiGLU, norm._RMSNorm) are
autograd Functions next to the PyTorch references; docs/model.md "Speed" has the measurements. Compiled graphs (the decode
step, `compile_kernels`, `--compile` training) keep the PyTorch code, which inductor fuses.

Build: `cc -O3 -march=native -fno-trapping-math -fopenmp -shared` (or $CC) into
~/.cache/nanoseek/kernels/<key>/ (or $NANOSEEK_CACHE/kernels), where the key hashes the sources,
the flags, the compiler's version and the CPU's feature flags, so a cache shared between
machines never loads a library built for another CPU. -fopenmp links libgomp, which resolves to
the libgomp PyTorch has already loaded (one OpenMP runtime, one thread pool, torch's thread
count); a compiler without OpenMP gets a single-threaded build. Each build is written to a temporary name
and renamed into place (concurrent processes, e.g. torchrun ranks, may both build; one wins,
both load a complete file). A build takes ~1 s, once per machine. Without a working compiler,
or with NANOSEEK_CPU_KERNELS=0, or with `cpu_kernels.enabled = False`, nothing changes but the
speed: the PyTorch path runs. The C code reads and writes only tensors this module allocated or
checked (CPU, contiguous, dtype, shape), and ctypes releases the GIL for the call, so server
threads run alongside.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .._runtime import cache_root, switched_off

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("kernels")
_FILES = ("kernels.c", "vec_math.h", "sinkhorn.h", "swiglu.h", "mhc.h", "ce.h", "attn.h", "norm.h")  # kernels.c includes the others
MAX_N = 8          # the kernel's limits (hc_mult is 4 in every V4 config, sinkhorn iters 20)
MAX_ITERS = 64

# the switch the tests and benchmarks flip (False: the PyTorch path everywhere)
enabled = not switched_off("NANOSEEK_CPU_KERNELS")
swiglu_bf16 = True  # bf16 tensors take the SwiGLU kernel too (False: PyTorch's bf16 ops; a benchmark switch)

_REAL = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}   # (the C arithmetic's type)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_SWIGLU_REAL = {**_REAL, torch.bfloat16: ctypes.c_float}   # SwiGLU also reads and writes bf16
# mHC's stream kernels: the streams' dtype -> that of the per-token weights, fn and the arithmetic
# (bf16 streams, autocast's: float arithmetic, each result rounded once; kernels/mhc.h)
_STREAM_REAL = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
_MHC_KERNELS = ("stream_mix", "stream_mix_backward", "weighted_sum", "weighted_sum_backward", "collapse_backward",
                "mix_rms", "collapse_mix_backward")


def _compiler() -> list[str] | None:
    """$CC (which may carry a wrapper or flags: "ccache gcc"), else the first of cc, gcc, clang."""
    cc = shlex.split(os.environ.get("CC", ""))
    if cc:
        return cc
    found = next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)
    return [found] if found else None


def _cpu_flags() -> str:
    """What decides which instructions -march=native may use: the CPU's feature flags (Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: list[str]) -> Path:
    """Compile the kernels (or find them in the cache); returns the shared library's path."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    # -fno-trapping-math: no FP exceptions are ever unmasked, and without it gcc keeps the
    # clamps in the kernel's exp as branches and leaves that loop scalar (results are the same)
    # a compiler without OpenMP: single-threaded; without -march=native: generic code
    attempts = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
    errors = []
    for opt in attempts:
        flags = [*opt, "-fno-trapping-math", "-std=c99", "-fPIC", "-shared"]
        key = hashlib.sha256()
        for name in _FILES:
            key.update((SOURCES / name).read_bytes())
        for part in (" ".join(flags), version, _cpu_flags(), platform.machine()):
            key.update(part.encode())
        target = cache_root() / "kernels" / key.hexdigest()[:20] / "nanoseek_kernels.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [*cc, *flags, "-I", str(SOURCES), str(SOURCES / "kernels.c"), "-o", tmp, "-lm"]
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{' '.join(cmd)}: {run.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, a failed build: logged once, PyTorch path)."""
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: the eager CPU paths use PyTorch ops only")
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("nanoseek's CPU kernels did not build (%s): the PyTorch path runs instead", exc)
        return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    lib.sinkhorn_tokens_per_block.restype = long
    lib.tokens_per_block = lib.sinkhorn_tokens_per_block()   # Sinkhorn's block, for its workspace
    lib.mhc_wide_rows.restype = long
    lib.wide_rows = lib.mhc_wide_rows()   # the mix kernels' widened rows a thread (bf16 streams)
    for dtype, real in _REAL.items():
        for name, args in (("sinkhorn", [ptr, ptr, ptr, ptr, long, long, long, real, ptr, long, long]),
                           ("swiglu", [ptr, ptr, ptr, long, real, ctypes.c_int]),
                           ("swiglu_backward", [ptr, ptr, ptr, ptr, ptr, long, real, ctypes.c_int]),
                           ("stream_mix", [ptr] * 5 + [long] * 3),
                           ("stream_mix_backward", [ptr] * 9 + [long] * 3),
                           ("weighted_sum", [ptr] * 3 + [long] * 3),
                           ("weighted_sum_backward", [ptr] * 5 + [long] * 3),
                           ("collapse_backward", [ptr] * 5 + [long] * 3),
                           ("mix_rms", [ptr] * 4 + [long] * 4 + [ptr]),
                           ("collapse_mix_backward", [ptr] * 10 + [long] * 5 + [ptr])):
            fn = getattr(lib, f"{name}_{_SUFFIX[dtype]}")
            fn.argtypes, fn.restype = args, None
    for name, args in (("swiglu", [ptr, ptr, ptr, long, ctypes.c_float, ctypes.c_int]),
                       ("swiglu_backward", [ptr, ptr, ptr, ptr, ptr, long, ctypes.c_float, ctypes.c_int])):
        fn = getattr(lib, f"{name}_bf16")
        fn.argtypes, fn.restype = args, None
    for name in _MHC_KERNELS:   # (pointers and sizes only: the same arguments as their _f32 versions)
        fn = getattr(lib, f"{name}_bf16")
        fn.argtypes, fn.restype = getattr(lib, f"{name}_f32").argtypes, None
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"ce_rows_{suffix}")
        fn.argtypes, fn.restype = [ptr] * 5 + [long, long, ctypes.c_int, ptr, long], None
    lib.attn_softmax_bf16.argtypes = [ptr] * 4 + [long] * 4 + [ctypes.c_float, ptr, long]
    lib.attn_softmax_backward_bf16.argtypes = [ptr] * 3 + [long, long, ctypes.c_float, long]
    lib.attn_softmax_bf16.restype = lib.attn_softmax_backward_bf16.restype = None
    for dtype, suffix in _SUFFIX.items():
        forward, backward = getattr(lib, f"rms_norm_{suffix}"), getattr(lib, f"rms_norm_backward_{suffix}")
        forward.argtypes = [ptr] * 4 + [long, long, _SWIGLU_REAL[dtype], long]   # eps: float for bf16 tensors
        backward.argtypes = [ptr] * 6 + [long, long, ptr, long, long]
        forward.restype = backward.restype = None
    return lib


def available() -> bool:
    """Whether the kernels are switched on and built (builds them on the first call)."""
    return enabled and _library() is not None


def sinkhorn_applies(logits: torch.Tensor, iters: int) -> bool:
    """Whether `sinkhorn` can run these logits ([..., n, n], CPU, fp32/fp64) in eager mode."""
    return (logits.device.type == "cpu" and logits.dtype in _REAL and logits.dim() >= 2
            and logits.shape[-1] == logits.shape[-2] and 1 <= logits.shape[-1] <= MAX_N
            and 1 <= iters <= MAX_ITERS and not torch.compiler.is_compiling() and available())


def _checked(name: str, first: torch.Tensor, *others: torch.Tensor, shapes: list | None = None, dtypes=_REAL):
    """The library, after checking what the C code will read: CPU tensors of one supported dtype
    and the given shapes (default: first's shape for all), so that a direct caller that skipped
    *_applies gets an error, never a bad read."""
    lib = _library() if enabled else None
    if lib is None:
        raise RuntimeError(f"{name}: nanoseek's CPU kernels are not available (see cpu_kernels.available())")
    tensors = (first, *others)
    for t, shape in zip(tensors, shapes or [first.shape] * len(tensors)):
        if t.device.type != "cpu" or t.dtype != first.dtype or t.dtype not in dtypes or t.shape != shape:
            want = ", ".join(str(tuple(s)) for s in shapes) if shapes else "one shape"
            kinds = "/".join(str(d).removeprefix("torch.") for d in dtypes)
            raise ValueError(f"{name}: needs CPU {kinds} tensors of one dtype and shapes {want}, got "
                             + ", ".join(f"{tuple(u.shape)} {u.dtype} on {u.device}" for u in tensors))
    return lib


def _call(logits: torch.Tensor, grad: torch.Tensor | None, iters: int, eps: float) -> torch.Tensor:
    name = "sinkhorn" if grad is None else "sinkhorn_backward"
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or not 1 <= iters <= MAX_ITERS:
        raise ValueError(f"{name}: needs [..., n, n] logits and 1 <= iters <= {MAX_ITERS}, "
                         f"got {tuple(logits.shape)}, iters={iters}")
    lib = _checked(name, logits, *(() if grad is None else (grad.to(logits.dtype),)))
    n = logits.shape[-1]
    x = logits.detach().contiguous()
    result = torch.empty_like(x)
    threads = max(1, torch.get_num_threads())
    work_size = (3 * n * n + (2 * iters - 1) * n) * lib.tokens_per_block    # one block's, per thread
    work = torch.empty(threads * work_size, dtype=x.dtype)
    if grad is None:
        args = (x.data_ptr(), result.data_ptr(), None, None)
    else:
        g = grad.detach().to(x.dtype).contiguous()
        args = (x.data_ptr(), None, g.data_ptr(), result.data_ptr())
    fn = getattr(lib, f"sinkhorn_{_SUFFIX[x.dtype]}")
    fn(*args, x.numel() // (n * n), n, iters, eps, work.data_ptr(), work_size, threads)
    return result


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """hyper_connections.sinkhorn's result (no autograd); needs sinkhorn_applies(logits, iters)."""
    return _call(logits, None, iters, eps)


def sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """d(sum(grad * sinkhorn(logits))) / d logits (the forward is recomputed from the logits)."""
    return _call(logits, grad, iters, eps)


def swiglu_applies(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `swiglu` can run this gate / up pair (same shape, CPU, fp32/fp64/bf16) in eager mode."""
    return (gate.device.type == "cpu" and gate.dtype in _SWIGLU_REAL and up.dtype == gate.dtype
            and (swiglu_bf16 or gate.dtype != torch.bfloat16)
            and up.device == gate.device and up.shape == gate.shape
            and not torch.compiler.is_compiling() and available())


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """moe.swiglu's result (no autograd); needs swiglu_applies(gate, up)."""
    lib = _checked("swiglu", gate, up, dtypes=_SWIGLU_REAL)
    g, u = gate.detach().contiguous(), up.detach().contiguous()
    y = torch.empty_like(g)
    getattr(lib, f"swiglu_{_SUFFIX[g.dtype]}")(g.data_ptr(), u.data_ptr(), y.data_ptr(), g.numel(),
                                                       limit, limit > 0)   # limit <= 0: no clamps
    return y


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor, limit: float):
    """(d gate, d up) of sum(grad * swiglu(gate, up, limit))."""
    lib = _checked("swiglu_backward", gate, up, grad.to(gate.dtype), dtypes=_SWIGLU_REAL)
    g, u = gate.detach().contiguous(), up.detach().contiguous()
    dy = grad.detach().to(g.dtype).contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(u)
    getattr(lib, f"swiglu_backward_{_SUFFIX[g.dtype]}")(
        g.data_ptr(), u.data_ptr(), dy.data_ptr(), dg.data_ptr(), du.data_ptr(), g.numel(), limit, limit > 0)
    return dg, du


def mhc_applies(*tensors: torch.Tensor) -> bool:
    """Whether the mHC stream kernels can run on these tensors (CPU, in eager mode; the streams
    [..., n, d] first, fp32 / fp64 / bf16; the others each in the streams' dtype or, for the
    per-token weights and fn, in their arithmetic's: fp32 for bf16 streams)."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in _STREAM_REAL or first.dim() < 2:
        return False
    dtypes = (first.dtype, _STREAM_REAL[first.dtype])
    return (all(t.device == first.device and t.dtype in dtypes for t in tensors)
            and not torch.compiler.is_compiling() and available())


def _small_checked(name: str, streams: torch.Tensor, tensors, shapes) -> None:
    """The per-token weights (and fn, ...) beside streams: CPU, the arithmetic's dtype, these shapes."""
    real = _STREAM_REAL[streams.dtype]
    for t, shape in zip(tensors, shapes):
        if t.device.type != "cpu" or t.dtype != real or t.shape != torch.Size(shape):
            raise ValueError(f"{name}: needs a CPU {real} tensor of shape {tuple(shape)} beside {streams.dtype} "
                             f"streams {tuple(streams.shape)}, got {tuple(t.shape)} {t.dtype} on {t.device}")


def _streams(name: str, streams: torch.Tensor, *others: torch.Tensor, kinds: str):
    """Check streams [..., n, d] and the others ("y": [..., d] and "x": like the streams, both in
    the streams' dtype; "w": [..., n] and "c": [..., n, n], in the arithmetic's: _STREAM_REAL);
    returns (library, tokens, n, d, contiguous detached tensors)."""
    if streams.dim() < 2:
        raise ValueError(f"{name}: needs streams [..., n, d], got {tuple(streams.shape)}")
    lead, (n, d) = streams.shape[:-2], streams.shape[-2:]
    want = {"y": (*lead, d), "w": (*lead, n), "c": (*lead, n, n), "x": streams.shape}
    big = [(t, torch.Size(want[k])) for t, k in zip(others, kinds) if k in "xy"]
    lib = _checked(name, streams, *(t for t, _ in big), shapes=[streams.shape, *(s for _, s in big)],
                   dtypes=_STREAM_REAL)
    small = [(t, want[k]) for t, k in zip(others, kinds) if k in "wc"]
    _small_checked(name, streams, [t for t, _ in small], [shape for _, shape in small])
    return lib, lead.numel(), n, d, [t.detach().contiguous() for t in (streams, *others)]


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def stream_mix(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """out[..., k, :] = sum_j comb[..., j, k] X_j + post_k y: HyperConnection.expand (no autograd);
    needs mhc_applies(streams, y, post, comb)."""
    lib, tokens, n, d, (x, y, post, comb) = _streams("stream_mix", streams, y, post, comb, kinds="ywc")
    out = torch.empty_like(x)
    getattr(lib, f"stream_mix_{_SUFFIX[x.dtype]}")(y.data_ptr(), x.data_ptr(), post.data_ptr(), comb.data_ptr(),
                                                   out.data_ptr(), tokens, n, d)
    return out


def stream_mix_backward(y: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                        grad: torch.Tensor, needs: tuple[bool, ...] = (True,) * 4):
    """(d y, d streams, d post, d comb) of sum(grad * stream_mix(...)); None where `needs` is False."""
    lib, tokens, n, d, (x, y, post, comb, g) = _streams(
        "stream_mix_backward", streams, y, post, comb, grad.to(streams.dtype), kinds="ywcx")
    grads = [torch.empty_like(t) if need else None for t, need in zip((y, x, post, comb), needs)]
    getattr(lib, f"stream_mix_backward_{_SUFFIX[x.dtype]}")(
        y.data_ptr(), x.data_ptr(), post.data_ptr(), comb.data_ptr(), g.data_ptr(), *map(_ptr, grads), tokens, n, d)
    return tuple(grads)


def weighted_sum(weights: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """sum_j w_j X_j: weights [..., n], streams [..., n, d] -> [..., d] (no autograd); needs
    mhc_applies(streams, weights)."""
    lib, tokens, n, d, (x, w) = _streams("weighted_sum", streams, weights, kinds="w")
    out = x.new_empty(*x.shape[:-2], d)
    getattr(lib, f"weighted_sum_{_SUFFIX[x.dtype]}")(w.data_ptr(), x.data_ptr(), out.data_ptr(), tokens, n, d)
    return out


def weighted_sum_backward(weights: torch.Tensor, streams: torch.Tensor, grad: torch.Tensor,
                          needs: tuple[bool, bool] = (True, True)):
    """(d weights, d streams) of sum(grad * weighted_sum(weights, streams)); None where not needed."""
    lib, tokens, n, d, (x, w, g) = _streams("weighted_sum_backward", streams, weights, grad.to(streams.dtype),
                                            kinds="wy")
    grads = [torch.empty_like(t) if need else None for t, need in zip((w, x), needs)]
    getattr(lib, f"weighted_sum_backward_{_SUFFIX[x.dtype]}")(
        w.data_ptr(), x.data_ptr(), g.data_ptr(), *map(_ptr, grads), tokens, n, d)
    return tuple(grads)


def collapse_backward(weights: torch.Tensor, streams: torch.Tensor, grad: torch.Tensor,
                      coef: torch.Tensor) -> torch.Tensor:
    """w_j g + coef X_j for weights [..., n], streams [..., n, d], grad [..., d], coef [...]: the
    streams' gradient of a collapse through its weighted sum and its mix's RMS factor
    (hyper_connections._Collapse adds the mix's matmul part)."""
    lead = streams.shape[:-2]
    lib, tokens, n, d, (x, w, g) = _streams("collapse_backward", streams, weights, grad.to(streams.dtype),
                                            kinds="wy")
    c = coef.detach().to(_STREAM_REAL[x.dtype]).contiguous()
    _small_checked("collapse_backward", x, [c], [lead])
    gx = torch.empty_like(x)
    getattr(lib, f"collapse_backward_{_SUFFIX[x.dtype]}")(w.data_ptr(), x.data_ptr(), g.data_ptr(), c.data_ptr(),
                                                          gx.data_ptr(), tokens, n, d)
    return gx



MIX_MAX_BYTES = 8 * 32   # mhc.h: a token's mix outputs fill at most MIX_MAXV 32-byte vectors


def mix_applies(flat: torch.Tensor, fn: torch.Tensor) -> bool:
    """Whether `mix_rms` / `collapse_mix_backward` can run: flat streams [T, K] (fp32 / fp64 / bf16)
    and fn [M, K] in their arithmetic's dtype (fp32 for bf16 streams), CPU, at most MIX_MAX_BYTES
    of outputs a token (M <= 64 in fp32), eager."""
    return (flat.device.type == "cpu" and flat.dtype in _STREAM_REAL and flat.dim() == 2 and fn.dim() == 2
            and fn.dtype == _STREAM_REAL[flat.dtype] and fn.device == flat.device and fn.shape[1] == flat.shape[1]
            and 0 < fn.shape[0] * fn.element_size() <= MIX_MAX_BYTES
            and not torch.compiler.is_compiling() and available())


def _mix_checked(name: str, flat: torch.Tensor, fn: torch.Tensor):
    if flat.dim() != 2 or fn.dim() != 2 or fn.shape[1] != flat.shape[1] or not (
            0 < fn.shape[0] * fn.element_size() <= MIX_MAX_BYTES):
        raise ValueError(f"{name}: needs flat [T, K] and fn [M, K] with M * element size <= {MIX_MAX_BYTES}, "
                         f"got {tuple(flat.shape)} and {tuple(fn.shape)}")
    lib = _checked(name, flat, dtypes=_STREAM_REAL)
    _small_checked(name, flat, [fn], [fn.shape])
    return lib


def mix_rms(flat: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat @ fn^T [T, M], sum of squares of each row of flat [T]) in one pass over flat [T, K]:
    the mHC mix's product and its RMS statistic (hyper_connections._Collapse); needs
    mix_applies(flat, fn)."""
    lib = _mix_checked("mix_rms", flat, fn)
    x = flat.detach().contiguous()
    (tokens, width), m = x.shape, fn.shape[0]
    lanes = 32 // fn.element_size()
    # fn^T with its columns padded to whole vectors: one row of it per k, read as MV vectors
    fn_t = fn.new_zeros(width, -(-m // lanes) * lanes)
    fn_t[:, :m] = fn.detach().t()
    raw, ss = fn.new_empty(tokens, m), fn.new_empty(tokens)
    threads = max(1, torch.get_num_threads())
    wide = _wide_rows(lib, x, fn, threads)   # (held here: the C call writes into it)
    getattr(lib, f"mix_rms_{_SUFFIX[x.dtype]}")(x.data_ptr(), fn_t.data_ptr(), raw.data_ptr(), ss.data_ptr(),
                                                tokens, width, m, threads, _ptr(wide))
    return raw, ss


def _wide_rows(lib, x: torch.Tensor, fn: torch.Tensor, threads: int) -> torch.Tensor | None:
    """bf16 streams: the mix kernels' per-thread workspace of widened rows (kernels/mhc.h rows())."""
    return fn.new_empty(threads * lib.wide_rows * x.shape[-1]) if x.dtype == torch.bfloat16 else None


def collapse_mix_backward(weights: torch.Tensor, streams: torch.Tensor, grad: torch.Tensor, coef: torch.Tensor,
                          g_mix: torch.Tensor, fn: torch.Tensor, extra: torch.Tensor | None = None,
                          needs: tuple[bool, bool] = (True, True)):
    """A whole collapse's (d streams, d fn), None where `needs` is False: for weights [..., n],
    streams [..., n, d], grad [..., d], coef [...], g_mix [..., M] (the mix's gradient times r) and
    fn [M, n d],
        d streams = w_j g + coef X_j + g_mix fn (+ extra, another gradient of the streams),
        d fn      = g_mix^T X
    in one pass over the streams (collapse_backward, the two GEMMs and the add, fused)."""
    lead, n, d = streams.shape[:-2], streams.shape[-2], streams.shape[-1]
    lib, tokens, _, _, (x, w, g) = _streams("collapse_mix_backward", streams, weights, grad.to(streams.dtype),
                                            kinds="wy")
    m = fn.shape[0]
    flat = x.view(tokens, n * d)
    _mix_checked("collapse_mix_backward", flat, fn)
    real = _STREAM_REAL[x.dtype]
    c, gm, f = (t.detach().to(real).contiguous() for t in (coef, g_mix, fn))
    e = None if extra is None else extra.detach().to(x.dtype).contiguous()
    _small_checked("collapse_mix_backward", x, [c, gm], [lead, (*lead, m)])
    if e is not None:
        _checked("collapse_mix_backward", x, e, dtypes=_STREAM_REAL)
    gx = torch.empty_like(x) if needs[0] else None
    gfn = f.new_empty(m, n * d) if needs[1] else None
    threads = max(1, torch.get_num_threads())
    work = f.new_empty(threads * m * n * d) if needs[1] else None
    wide = _wide_rows(lib, flat, f, threads)   # (held here: the C call writes into it)
    getattr(lib, f"collapse_mix_backward_{_SUFFIX[x.dtype]}")(
        w.data_ptr(), x.data_ptr(), g.data_ptr(), c.data_ptr(), gm.data_ptr(), f.data_ptr(), _ptr(e), _ptr(gx),
        _ptr(gfn), _ptr(work), tokens, n, d, m, threads, _ptr(wide))
    return gx, gfn


_CE_DTYPES = {**_REAL, torch.bfloat16: ctypes.c_float}   # logits: fp32 / fp64, or bf16 (fp32 arithmetic)


def ce_applies(logits: torch.Tensor) -> bool:
    """Whether `cross_entropy_rows` can run on these logits ([rows, V], CPU, fp32/fp64/bf16) in
    eager mode."""
    return (logits.device.type == "cpu" and logits.dtype in _CE_DTYPES and logits.dim() == 2
            and logits.shape[1] > 0 and not torch.compiler.is_compiling() and available())


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                       grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of logits [rows, V]: (log-sum-exp [rows], logit of the label [rows]), both in fp32
    (fp64 for fp64 logits); with `grad`, logits is overwritten in place by (softmax - one-hot(label))
    * weight, the gradient of each row's cross-entropy times its weight, in the logits' dtype.
    labels [rows] int64 in [0, V) (checked), weight [rows] (0 for ignored rows). No autograd:
    loss._LinearCrossEntropy is the caller; needs ce_applies(logits) and a contiguous tensor."""
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(f"cross_entropy_rows: needs contiguous [rows, V] logits, got {tuple(logits.shape)}")
    rows, v = logits.shape
    lib = _checked("cross_entropy_rows", logits, dtypes=_CE_DTYPES)
    real = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lab = labels.detach().to(torch.int64).contiguous()
    w = weight.detach().to(real).contiguous()
    if lab.shape != (rows,) or w.shape != (rows,) or lab.device != logits.device or w.device != logits.device:
        raise ValueError(f"cross_entropy_rows: needs labels and weight of shape ({rows},) on the CPU, got "
                         f"{tuple(lab.shape)} on {lab.device} and {tuple(w.shape)} on {w.device}")
    if rows and (int(lab.min()) < 0 or int(lab.max()) >= v):   # the C code indexes each row by its label
        raise IndexError(f"cross_entropy_rows: labels must be in [0, {v}), got [{int(lab.min())}, {int(lab.max())}]")
    lse, target = logits.new_empty(rows, dtype=real), logits.new_empty(rows, dtype=real)
    threads = max(1, torch.get_num_threads())
    work = torch.empty(threads * v, dtype=real)   # one row buffer per thread
    getattr(lib, f"ce_rows_{_SUFFIX[logits.dtype]}")(logits.data_ptr(), lab.data_ptr(), w.data_ptr(), lse.data_ptr(),
                                                     target.data_ptr(), rows, v, int(grad), work.data_ptr(), threads)
    return lse, target


def attn_applies(scores: torch.Tensor) -> bool:
    """Whether `attn_softmax` / `attn_softmax_backward` can run on these scores (bf16 [G, R, K]
    on the CPU, eager)."""
    return (scores.device.type == "cpu" and scores.dtype == torch.bfloat16 and scores.dim() == 3
            and scores.shape[-1] > 0 and not torch.compiler.is_compiling() and available())


def attn_softmax(scores: torch.Tensor, mask: torch.Tensor, sink: torch.Tensor, heads: int,
                 scale: float) -> torch.Tensor:
    """The sink softmax of raw scores [G, R, K] (bf16, contiguous; rows query-major, head-minor)
    with an additive mask [G, R / heads, K] (bf16) and per-head sink logits [heads], in place:
    scores become the probabilities (rounded to bf16). Returns each row's log-normaliser [G, R]
    (fp32, the sink included). No autograd: attention._BmmSinkAttention is the caller."""
    g, r, k = scores.shape
    if not scores.is_contiguous() or r % heads:
        raise ValueError(f"attn_softmax: needs contiguous scores with rows a multiple of {heads}, "
                         f"got {tuple(scores.shape)}")
    mask = mask.contiguous()
    lib = _checked("attn_softmax", scores, mask, shapes=[(g, r, k), (g, r // heads, k)], dtypes=(torch.bfloat16,))
    sk = sink.detach().to(torch.float32).contiguous()
    if sk.shape != (heads,) or sk.device != scores.device:
        raise ValueError(f"attn_softmax: needs sink logits of shape ({heads},) on the CPU, got {tuple(sk.shape)}")
    lse = torch.empty(g, r, dtype=torch.float32)
    threads = max(1, torch.get_num_threads())
    work = torch.empty(threads * k, dtype=torch.float32)   # one row buffer per thread
    lib.attn_softmax_bf16(scores.data_ptr(), mask.data_ptr(), sk.data_ptr(), lse.data_ptr(), g, r, heads, k,
                          scale, work.data_ptr(), threads)
    return lse


def attn_softmax_backward(dp: torch.Tensor, p: torch.Tensor, delta: torch.Tensor, scale: float) -> None:
    """In place over dp [G, R, K] (bf16, contiguous: g v^T): p (dp - delta) scale, the gradient of
    the raw scores, with p the probabilities attn_softmax wrote and delta [G, R] (fp32) g . out."""
    if not dp.is_contiguous():
        raise ValueError("attn_softmax_backward: needs contiguous dp")
    p = p.contiguous()
    lib = _checked("attn_softmax_backward", dp, p, dtypes=(torch.bfloat16,))
    d = delta.detach().to(torch.float32).contiguous()
    if d.shape != dp.shape[:2] or d.device != dp.device:
        raise ValueError(f"attn_softmax_backward: needs delta of shape {tuple(dp.shape[:2])}, got {tuple(d.shape)}")
    lib.attn_softmax_backward_bf16(dp.data_ptr(), p.data_ptr(), d.data_ptr(), dp.shape[0] * dp.shape[1],
                                   dp.shape[2], scale, max(1, torch.get_num_threads()))


# RMSNorm (kernels/norm.h): x fp32 / fp64 / bf16; weight, r and the weight's gradient in the
# arithmetic's dtype (fp32 for bf16 x)
_NORM_REAL = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32}
NORM_BLOCK = 32   # tokens per partial row of the weight's gradient: fixed, so its bits never depend on the threads


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm` can run x [..., d] (CPU, fp32/fp64/bf16) with this weight (None, or [d]
    fp32; fp64 for fp64 x) in eager mode."""
    return (x.device.type == "cpu" and x.dtype in _NORM_REAL and x.dim() >= 1 and x.shape[-1] > 0
            and (weight is None or (weight.device == x.device and weight.dtype == _NORM_REAL[x.dtype]
                                    and weight.shape == x.shape[-1:]))
            and not torch.compiler.is_compiling() and available())


def _norm_checked(name: str, x: torch.Tensor, weight: torch.Tensor | None, *grad: torch.Tensor,
                  r: torch.Tensor | None = None):
    """The library, after checking x [..., d] (and grad: its shape and dtype), weight [d] or None
    and r [...], both in the arithmetic's dtype."""
    if x.dim() < 1:
        raise ValueError(f"{name}: needs x [..., d], got a scalar")
    lib = _checked(name, x, *grad, dtypes=_NORM_REAL)
    real = _NORM_REAL[x.dtype]
    for what, t, shape in (("weight", weight, x.shape[-1:]), ("r", r, x.shape[:-1])):
        if t is not None and (t.device.type != "cpu" or t.dtype != real or t.shape != shape):
            raise ValueError(f"{name}: needs {what} of shape {tuple(shape)} and dtype {real} on the CPU for x "
                             f"{tuple(x.shape)} {x.dtype}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return lib


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, r) for x [..., d]: y = x r * weight (weight None: x r) in x's dtype (bf16: computed in
    fp32, rounded once), r = 1 / sqrt(mean(x^2) + eps) [...] in fp32 (fp64 for fp64 x), kept for
    rms_norm_backward. No autograd: norm._RMSNorm is the caller; needs rms_norm_applies(x, weight)."""
    lib = _norm_checked("rms_norm", x, weight)
    xs = x.detach().contiguous()
    w = None if weight is None else weight.detach().contiguous()
    y, r = torch.empty_like(xs), xs.new_empty(xs.shape[:-1], dtype=_NORM_REAL[xs.dtype])
    getattr(lib, f"rms_norm_{_SUFFIX[xs.dtype]}")(xs.data_ptr(), _ptr(w), y.data_ptr(), r.data_ptr(), r.numel(),
                                                 xs.shape[-1], eps, max(1, torch.get_num_threads()))
    return y, r


def rms_norm_backward(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None, grad: torch.Tensor,
                      needs: tuple[bool, bool] = (True, True)):
    """(d x, d weight) of sum(grad * rms_norm(x, weight, eps)[0]), from x and the forward's r: d x in
    x's dtype, d weight in the weight's; None where `needs` is False (d weight: or no weight)."""
    g = grad.detach().to(x.dtype)
    lib = _norm_checked("rms_norm_backward", x, weight, g, r=r)
    xs, rs, g = x.detach().contiguous(), r.detach().contiguous(), g.contiguous()
    w = None if weight is None else weight.detach().contiguous()
    tokens, d = rs.numel(), xs.shape[-1]
    gx = torch.empty_like(xs) if needs[0] else None
    gw = torch.empty_like(w) if needs[1] and w is not None else None
    # one partial row of the weight's gradient per block of NORM_BLOCK tokens, added in order
    work = rs.new_empty(-(-tokens // NORM_BLOCK) * d if gw is not None else 0)
    getattr(lib, f"rms_norm_backward_{_SUFFIX[xs.dtype]}")(xs.data_ptr(), rs.data_ptr(), _ptr(w), g.data_ptr(),
                                                          _ptr(gx), _ptr(gw), tokens, d, work.data_ptr(), NORM_BLOCK,
                                                          max(1, torch.get_num_threads()))
    return gx, gw
