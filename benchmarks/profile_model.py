"""Where a training step's time goes: torch.profiler op tables of the model's plain reference paths
vs its fast paths, in one run (the tables in docs/model.md "Speed" come from here).

    python benchmarks/profile_model.py                  # small config, 4 x 512, fp32, 2 threads
    python benchmarks/profile_model.py --rows 15 --threads 1
    python benchmarks/profile_model.py --decode         # also one eager batch-1 decode step
    python benchmarks/profile_model.py --switches --preset speedrun   # each fast path off vs on
    python benchmarks/profile_model.py --switches --bf16              # the same under bf16 autocast
    python benchmarks/profile_model.py --switches --switch HyperConnection.stream_kernels   # one switch
    python benchmarks/profile_model.py --switches --switch Experts.fused --processes 3    # whole runs per mode
    python benchmarks/profile_model.py --switches --switch grouped_mm.enabled --prefill  # a prefill instead
    python benchmarks/profile_model.py --op-times --bf16  # every aten op of a fast step timed, by op and shape
    python benchmarks/profile_model.py --op-times --v4 --preset speedrun   # the same, the trainer's objective
    python benchmarks/profile_model.py --by-module --v4 --preset speedrun  # the same step's time by module

--by-module times the same step's aten ops (as --op-times) and adds them up by module: a
forward op belongs to the innermost module running, a backward op to the module whose forward
created the autograd node that runs it (ModuleTimer); layer indices are folded ("layers.L.attn"),
so the rows are per kind of module, summed over the layers.

"reference" switches every fast path off: attention as the op-by-op joint softmax
(`Attention.use_sdpa = False`), mHC as plain autograd formulas (`HyperConnection.fused = False`,
which also leaves out the C Sinkhorn of `cpu_kernels`) and the head's cross-entropy over kept
logits (`loss(return_logits=True)`). "fast" is the default model. Each mode is timed (forward
+ loss + backward, median of --reps after a warm-up) and then profiled once; the tables list the
ops with the most self time. Timings on a shared machine move by 10-30% between runs; compare
the two modes of one run.

--switches instead times the full V4 objective's forward + backward (CE + MTP + balance +
indexer KL, what the trainer runs) with each fast-path switch off and on in alternating rounds
(`RMSNorm.fused`, `rope.use_complex`, `HyperConnection.fused`, `Attention.use_sdpa`,
`cpu_kernels.enabled`: all the C kernels, `HyperConnection.stream_kernels`: the C mHC stream passes,
`HyperConnection.collapse_function`: the collapse as one Function, `HyperConnection.mix_kernels`: its
mix products as C passes, `Experts.fused`: the routed
experts as one Function, `grouped_mm.enabled`: their products as MKL grouped GEMMs (fp32),
`Experts.bucket_rows`: their row counts padded to a multiple of 32,
`cpu_kernels.swiglu_bf16`, `Attention.fold_heads`, `Attention.bmm_softmax` and `Attention.reuse_lse` (the indexer's KL target
from the attention kernel's log-normaliser), `Transformer.autocast_streams` (bf16 residual streams): bf16 only;
`loss.use_kernel`: the head's
per-chunk cross-entropy as one C call) and prints
each one's ratio; `--preset speedrun` is the CPU speedrun's depth-3 model at 4 x 256 tokens.
Each round takes a new token batch (seeded: the same ones for both modes and every process), so
that, as in training, the experts' row counts change from step to step.
Alternating step by step is biased when the two modes allocate differently (the heap is re-faulted
in the other mode's shape at every switch); `--processes PAIRS` runs each mode in a process of its
own for a whole run instead (warm-up steps, then the median of --reps steps), PAIRS times each.

--op-times times every aten op of the default model's forward + loss + backward (`--bf16`: under
bf16 autocast) with a dispatch mode and a wall clock around each kernel call, and prints the time
by op and by op + input shapes, forward and backward apart, plus how much goes to ops under 30 us
(per-op overhead). Use it for big elementwise ops: on this kind of shared 2-core machine
torch.profiler's self times inflated 16 MB multiplies and batched products 10-20x (42 ms for a
[4, 512, 4, 512] multiply that takes ~2 ms), while the dispatch-mode times add up to the
step's own wall time. One bias: autograd accumulates a gradient that arrives from several
consumers in place (`add_`) in a plain run, but out of place (`add`) under the mode, whose Python
references keep the first gradient alive; read the backward `add` rows as an upper bound.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from nanoseek import ModelConfig, Transformer
from nanoseek.config import PRESETS
from nanoseek.model import cpu_kernels, grouped_mm, hyper_connections, moe, norm, rope
from nanoseek.model import loss as model_loss
from nanoseek.model.attention import Attention


def set_mode(fast: bool) -> None:
    Attention.use_sdpa = fast
    hyper_connections.HyperConnection.fused = fast
    cpu_kernels.enabled = fast
    grouped_mm.enabled = fast


def train_step(model, ids, fast: bool):
    def step():
        set_mode(fast)
        model.loss(ids, mtp_weight=0.0, indexer_weight=0.0, return_logits=not fast).loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def table(prof, rows: int) -> str:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | self time (ms) | share | calls |", "|---|---|---|---|"]
    for e in events[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3:.1f} | {e.self_cpu_time_total / total:.1%} | {e.count} |")
    lines.append(f"| **all ops** | **{total / 1e3:.1f}** | | **{sum(e.count for e in events)}** |")
    return "\n".join(lines)


class OpTimer(TorchDispatchMode):
    """Wall time of every aten op dispatched under it, keyed (phase, op, input shapes, dtypes)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.stats: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        dt = time.perf_counter() - t
        tensors = [a for a in args if isinstance(a, torch.Tensor)][:3]
        key = (self.phase, func.overloadpacket.__name__, " ".join(str(list(a.shape)) for a in tensors),
               "/".join(str(a.dtype).removeprefix("torch.") for a in tensors[:2]))
        self.stats[key][0] += dt
        self.stats[key][1] += 1
        return out

    def kernel_call(self, name: str, dt: float) -> None:
        """A C kernel's call (see _TimedKernels): an op of its own, "C:<function>"."""
        key = (self.phase, f"C:{name}", "", "")
        self.stats[key][0] += dt
        self.stats[key][1] += 1


class _TimedKernels:
    """While active, every call into nanoseek's C kernels (cpu_kernels: ctypes calls, which no
    dispatch mode sees) is timed and handed to timer.kernel_call(name, seconds), so the op and
    module tables include the kernels' time instead of leaving it out."""

    def __init__(self, timer):
        self.timer, self.saved = timer, None

    def __enter__(self):
        self.saved = cpu_kernels._library
        lib = self.saved()
        proxy = None if lib is None else _LibraryProxy(lib, self.timer)
        cpu_kernels._library = lambda: proxy
        return self

    def __exit__(self, *exc):
        cpu_kernels._library = self.saved


class _LibraryProxy:
    def __init__(self, lib, timer):
        self._lib, self._timer = lib, timer

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        if not callable(fn):
            return fn

        def timed(*args):
            t = time.perf_counter()
            out = fn(*args)
            self._timer.kernel_call(name, time.perf_counter() - t)
            return out
        return timed


def _timed_steps(model, ids, bf16: bool, v4: bool, timer, after_forward=None) -> float:
    """Warm-up steps, one plain step (its wall seconds are returned), one warm-up under `timer`,
    then one step under it, whose ops are then in timer.stats. A step: forward + loss (the V4
    objective with `v4`, else CE only) + backward, under bf16 autocast with `bf16`;
    after_forward(loss) runs between forward and backward."""
    terms = {} if v4 else {"mtp_weight": 0.0, "indexer_weight": 0.0}

    def step():
        timer.phase = "forward"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(ids, **terms).loss
        if after_forward is not None:
            after_forward(loss)
        timer.phase = "backward"
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t = time.perf_counter()
    step()
    wall = time.perf_counter() - t
    with timer, _TimedKernels(timer):
        step()  # (one warm-up under the mode: its first dispatches are slower)
    timer.stats.clear()
    with timer, _TimedKernels(timer):
        step()
    return wall


def _step_title(bf16: bool, v4: bool, ids: torch.Tensor, wall: float) -> str:
    return (f"{'bf16 autocast' if bf16 else 'fp32'} step ({'V4 objective' if v4 else 'CE only'}), "
            f"batch {tuple(ids.shape)}: {wall * 1e3:.0f} ms plain")


def op_times(model, ids, bf16: bool, rows: int, v4: bool = False) -> None:
    """Print where one fast forward + loss + backward goes, op by op (see the module docstring);
    `v4`: the trainer's whole V4 objective (CE + MTP + balance + indexer KL) instead of CE alone."""
    timer = OpTimer()
    wall = _timed_steps(model, ids, bf16, v4, timer)
    total = sum(v[0] for v in timer.stats.values())
    n = sum(v[1] for v in timer.stats.values())
    small = [v for v in timer.stats.values() if v[0] / v[1] < 30e-6]
    print(f"{_step_title(bf16, v4, ids, wall)}; "
          f"{n} aten ops and C kernel calls (C:...) timed, {total * 1e3:.0f} ms in all; {sum(v[1] for v in small)} ops under 30 us "
          f"take {sum(v[0] for v in small) * 1e3:.0f} ms\n")
    by_op: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    for (phase, op, _, _), (dt, c) in timer.stats.items():
        by_op[(phase, op)][0] += dt
        by_op[(phase, op)][1] += c
    lines = ["| phase | op | ms | share | calls |", "|---|---|---|---|---|"]
    for (phase, op), (dt, c) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {phase} | `{op}` | {dt * 1e3:.1f} | {dt / total:.1%} | {c} |")
    print("\n".join(lines) + "\n")
    lines = ["| phase | op | inputs | dtypes | ms | calls |", "|---|---|---|---|---|---|"]
    for (phase, op, shapes, dtypes), (dt, c) in sorted(timer.stats.items(), key=lambda kv: -kv[1][0])[:2 * rows]:
        lines.append(f"| {phase} | `{op}` | {shapes} | {dtypes} | {dt * 1e3:.1f} | {c} |")
    print("\n".join(lines))


OUTSIDE = "(outside modules)"


class ModuleTimer(TorchDispatchMode):
    """Wall time of every aten op dispatched under it, keyed (phase, module). A forward op
    belongs to the innermost module running; a backward op to the module whose forward created
    the autograd node that runs it: when a module's call returns, the nodes created during the
    call (autograd's sequence numbers) that no inner module claimed are tagged with its name.
    Module names keep their path with layer indices folded ("layers.L.attn"), so repeated
    blocks add up; ops outside every module (the head's loss) are OUTSIDE."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.phase, self.handles = model, "forward", []
        self.stats: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
        self.stack: list[tuple[str, int]] = [(OUTSIDE, 0)]

    def __enter__(self):
        for name, m in self.model.named_modules():
            if m is not self.model:
                label = ".".join("L" if part.isdigit() else part for part in name.split("."))
                self.handles.append(m.register_forward_pre_hook(lambda mod, args, label=label: self.stack.append(
                    (label, torch._C._autograd._get_sequence_nr()))))
                self.handles.append(m.register_forward_hook(lambda mod, args, out: self.claim(out, *self.stack.pop())))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return super().__exit__(*exc)

    @staticmethod
    def claim(out, label: str, first: int) -> None:
        """Tag the autograd nodes behind `out` created since sequence number `first`."""
        todo = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
        seen = set()
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen or node._sequence_nr() < first:
                continue
            seen.add(id(node))
            node.metadata.setdefault("module", label)
            todo += [nxt for nxt, _ in node.next_functions]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self._add(self._where(), time.perf_counter() - t)
        return out

    def _where(self) -> str:
        if self.phase == "forward":
            return self.stack[-1][0]
        node = torch._C._current_autograd_node()
        return node.metadata.get("module", OUTSIDE) if node is not None else OUTSIDE

    def _add(self, where: str, dt: float) -> None:
        self.stats[(self.phase, where)][0] += dt
        self.stats[(self.phase, where)][1] += 1

    def kernel_call(self, name: str, dt: float) -> None:
        """A C kernel's call (see _TimedKernels), counted like an aten op of the module running it."""
        self._add(self._where(), dt)


def _tensors(out) -> list[torch.Tensor]:
    """The tensors in a module's output (a tensor, a tuple / list / dict of them, a dataclass)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = vars(out)
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def by_module(model, ids, bf16: bool, rows: int, v4: bool = False) -> None:
    """Print where one fast forward + loss + backward goes, by module (ModuleTimer)."""
    timer = ModuleTimer(model)
    wall = _timed_steps(model, ids, bf16, v4, timer, after_forward=lambda loss: timer.claim(loss, OUTSIDE, 0))
    per: dict[str, list] = collections.defaultdict(lambda: [0.0, 0, 0.0, 0])
    for (phase, where), (dt, c) in timer.stats.items():
        row = per[where]
        row[0 if phase == "forward" else 2] += dt
        row[1 if phase == "forward" else 3] += c
    total = sum(r[0] + r[2] for r in per.values())
    print(f"{_step_title(bf16, v4, ids, wall)}; {total * 1e3:.0f} ms of aten ops and C kernel calls timed, by module "
          "(backward: the module whose forward made the autograd node)\n")
    lines = ["| module | forward ms | ops | backward ms | ops | share |", "|---|---|---|---|---|---|"]
    for where, (f, fc, b, bc) in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][2]))[:rows]:
        lines.append(f"| `{where}` | {f * 1e3:.1f} | {fc} | {b * 1e3:.1f} | {bc} | {(f + b) / total:.1%} |")
    print("\n".join(lines))


SWITCHES = {  # name -> (object, attribute) of the fast-path switches (True = the fast path)
    "RMSNorm.fused": (norm.RMSNorm, "fused"),
    "rope.use_complex": (rope, "use_complex"),
    "HyperConnection.fused": (hyper_connections.HyperConnection, "fused"),
    "Attention.use_sdpa": (Attention, "use_sdpa"),
    "cpu_kernels.enabled": (cpu_kernels, "enabled"),
    "HyperConnection.stream_kernels": (hyper_connections.HyperConnection, "stream_kernels"),
    "HyperConnection.collapse_function": (hyper_connections.HyperConnection, "collapse_function"),
    "HyperConnection.mix_kernels": (hyper_connections.HyperConnection, "mix_kernels"),
    "Experts.fused": (moe.Experts, "fused"),
    "grouped_mm.enabled": (grouped_mm, "enabled"),   # (fp32 only: bf16 products go to oneDNN one by one)
    "Experts.bucket_rows": (moe.Experts, "bucket_rows"),   # (bf16 autocast only: use --bf16)
    "cpu_kernels.swiglu_bf16": (cpu_kernels, "swiglu_bf16"),   # (bf16 autocast only: use --bf16)
    "Attention.fold_heads": (Attention, "fold_heads"),   # (bf16 autocast only: use --bf16)
    "Attention.bmm_softmax": (Attention, "bmm_softmax"),   # (bf16 autocast only: use --bf16)
    "Attention.reuse_lse": (Attention, "reuse_lse"),   # (bf16 autocast only: use --bf16)
    "loss.use_kernel": (model_loss, "use_kernel"),
    "Transformer.autocast_streams": (Transformer, "autocast_streams"),   # (bf16 autocast only: use --bf16)
}


def fresh_batches(model, ids: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n token batches shaped like `ids`, the same ones in every process (seeded): as in training,
    each step meets new expert row counts (a fixed batch repeats one routing, which hides what
    new matmul shapes cost; see `Experts.bucket_rows`)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, ids.shape, generator=g) for _ in range(n)]


def switch_ab(model, ids, reps: int, bf16: bool = False, only: list[str] | None = None, prefill: bool = False) -> None:
    """Median forward + backward of the V4 objective with each switch off vs on (the others on),
    under bf16 autocast with `bf16`; a new batch each round, the same one for both modes. With
    `prefill`: a cached, gradient-free prefill of each batch's first row instead (what the
    engine runs before decoding; the head for the last position only)."""
    def step(name: str, on: bool, ids: torch.Tensor) -> float:
        obj, attr = SWITCHES[name]
        setattr(obj, attr, on)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if prefill:
                with torch.no_grad():
                    model(ids[:1], cache=model.new_cache(1, ids.shape[1]), logits_to_keep=1)
            else:
                model.loss(ids).loss.backward()
                model.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        setattr(obj, attr, True)
        return dt

    what = f"prefill of {ids.shape[1]} tokens (cached, no gradients)" if prefill else \
        f"V4 objective forward + backward, batch {tuple(ids.shape)}"
    print(f"{what}{' (bf16 autocast)' if bf16 else ''}, threads={torch.get_num_threads()}, "
          f"median of {reps} alternating rounds")
    for name in only or SWITCHES:
        times = {False: [], True: []}
        for on in (False, True):
            step(name, on, ids)
        for batch in fresh_batches(model, ids, reps):
            for on in (False, True):
                times[on].append(step(name, on, batch))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"  {name:30s} off {off * 1e3:7.1f} ms   on {on * 1e3:7.1f} ms   {off / on:.3f}x")


def one_mode(model, ids, name: str, on: bool, steps: int, bf16: bool) -> None:
    """One mode of a --processes A/B, for a whole run: the switch set once, warm-up steps, then
    `steps` timed steps of the V4 objective (a new batch each, the same batches in every process);
    prints their median for the parent to read."""
    obj, attr = SWITCHES[name]
    setattr(obj, attr, on)
    times = []
    # warm-up steps first: the allocator settles (docs/model.md); a new batch every step
    for batch in fresh_batches(model, ids, steps + max(3, steps // 3)):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.loss(batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(f"MEDIAN_MS {statistics.median(times[-steps:]) * 1e3:.3f}")


def process_ab(args, names: list[str]) -> None:
    """Each switch off vs on, each mode in a process of its own for a whole run, in `args.processes`
    alternating pairs: unlike switch_ab's step-by-step alternation, no mode runs on a heap shaped
    by the other's allocations (docs/model.md "Speed": that biased one A/B by ~15%)."""
    base = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
            "--reps", str(max(args.reps, 8)), *(["--bf16"] if args.bf16 else []),
            *(["--threads", str(args.threads)] if args.threads else [])]
    print(f"V4 objective forward + backward{' (bf16 autocast)' if args.bf16 else ''}, batch ({args.batch}, "
          f"{args.seq}): each mode a process of its own, {args.processes} alternating pairs, median step of each")
    for name in names:
        runs = {False: [], True: []}
        for _ in range(args.processes):
            for on in (False, True):
                run = subprocess.run([*base, "--one-mode", f"{name}={int(on)}"], capture_output=True, text=True)
                if run.returncode != 0:
                    raise SystemExit(f"{name}={int(on)}: the measuring process failed:\n{run.stderr[-2000:]}")
                runs[on].append(float(run.stdout.split("MEDIAN_MS")[1].split()[0]))
        off, on = statistics.median(runs[False]), statistics.median(runs[True])
        pairs = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(runs[False], runs[True]))
        print(f"  {name:30s} off {off:7.1f} ms   on {on:7.1f} ms   {off / on:.3f}x   (pairs: {pairs})")


def build(args):
    """The model and token batch a run measures (--preset, --batch, --seq)."""
    torch.manual_seed(0)
    if args.preset == "speedrun":  # nanoseek/train/speedrun.py on CPU: depth 3, 4K vocabulary, 4 x 256
        from nanoseek.train.presets import scaled_model_config

        model = Transformer(scaled_model_config(depth=3, vocab_size=4096, seq_len=256))
    else:
        model = Transformer(ModelConfig.from_preset(args.preset))
    return model, torch.randint(0, model.config.vocab_size, (args.batch, args.seq))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=[*PRESETS, "speedrun"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--decode", action="store_true", help="also profile one eager batch-1 decode step")
    ap.add_argument("--switches", action="store_true", help="time each fast-path switch off vs on instead")
    ap.add_argument("--op-times", action="store_true",
                    help="instead: every aten op of a fast step timed (dispatch mode), by op and by shape")
    ap.add_argument("--by-module", action="store_true",
                    help="instead: the same step's aten time by module (forward: the module running; backward: "
                         "the module whose forward made the autograd node)")
    ap.add_argument("--bf16", action="store_true",
                    help="with --op-times, --by-module or --switches: steps under bf16 autocast")
    ap.add_argument("--switch", action="append", choices=list(SWITCHES), default=None,
                    help="with --switches: only this switch (repeatable)")
    ap.add_argument("--prefill", action="store_true",
                    help="with --switches (in one process): time a cached 1-row prefill of --seq tokens instead")
    ap.add_argument("--processes", type=int, default=0, metavar="PAIRS",
                    help="with --switches: each mode in processes of its own, PAIRS alternating pairs")
    ap.add_argument("--one-mode", default=None, help=argparse.SUPPRESS)   # (a --processes child: NAME=0|1)
    ap.add_argument("--v4", action="store_true",
                    help="with --op-times or --by-module: the whole V4 objective (what the trainer runs)")
    args = ap.parse_args()
    for name in ("batch", "seq", "reps", "rows"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.bf16 and not (args.op_times or args.by_module or args.switches or args.one_mode):
        ap.error("--bf16 applies to --op-times, --by-module and --switches only (the profiler tables time fp32 steps)")
    if args.processes < 0 or (args.processes and not args.switches):
        ap.error("--processes takes a number of pairs >= 1, with --switches")
    if args.prefill and (not args.switches or args.processes):
        ap.error("--prefill applies to --switches in one process (no --processes)")
    if args.preset == "speedrun" and args.seq == 512:   # (the speedrun's own sequence length)
        args.seq = 256
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.switches and args.processes:
        process_ab(args, args.switch or list(SWITCHES))
        return
    model, ids = build(args)
    if args.one_mode:
        name, on = args.one_mode.rsplit("=", 1)
        one_mode(model.train(), ids, name, on == "1", args.reps, args.bf16)
        return
    if args.switches:
        switch_ab(model.eval() if args.prefill else model, ids, max(args.reps, 8), args.bf16, args.switch,
                  args.prefill)
        return
    if args.op_times:
        op_times(model.train(), ids, args.bf16, args.rows, args.v4)
        return
    if args.by_module:
        by_module(model.train(), ids, args.bf16, args.rows, args.v4)
        return
    steps = {mode: train_step(model, ids, mode == "fast") for mode in ("reference", "fast")}
    times: dict[str, list[float]] = {m: [] for m in steps}
    for fn in steps.values():
        fn()
    for _ in range(args.reps):  # alternate, so drift of the machine hits both modes alike
        for mode, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[mode].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"{args.preset}, {args.batch} x {args.seq}, fp32, threads={torch.get_num_threads()}: forward + loss + "
          f"backward, median of {args.reps}")
    for mode in steps:
        print(f"  {mode:9s} {med[mode]:.2f} s  ({args.batch * args.seq / med[mode]:.0f} tok/s)")
    print(f"  fast / reference: {med['reference'] / med['fast']:.2f}x\n")
    for mode, fn in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"### {mode}\n\n{table(prof, args.rows)}\n")
    if args.decode:
        set_mode(True)
        model.eval()
        with torch.no_grad():
            cache = model.new_cache(1, args.seq + 8)
            tok = model(ids[:1], cache=cache)[:, -1:].argmax(-1)
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model(tok, cache=cache)
        print(f"### one eager decode step (batch 1, after {args.seq} tokens)\n\n{table(prof, args.rows)}\n")


if __name__ == "__main__":
    main()
