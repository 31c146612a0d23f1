"""benchmarks/profile_model.py --op-times: the per-op wall-clock timer the speed tables rely on."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..conftest import load_benchmark


def _tool():
    return load_benchmark("profile_model")


def test_op_timer_counts_each_product_in_its_phase():
    # three bias-free linears: the forward is 3 products; the backward 3 weight gradients and 2
    # input gradients (the network's input does not require one) -- counted independently of
    # autograd's internals by the layer structure alone
    torch.manual_seed(0)
    net = nn.Sequential(*(nn.Linear(32, 32, bias=False) for _ in range(3)))
    x = torch.randn(8, 32)
    timer = _tool().OpTimer()
    t = time.perf_counter()
    with timer:
        loss = net(x).square().sum()
        timer.phase = "backward"
        loss.backward()
    wall = time.perf_counter() - t
    calls = {}
    for (phase, op, shapes, dtypes), (dt, n) in timer.stats.items():
        assert dt > 0 and n > 0 and dtypes.startswith("float32")
        calls[(phase, op)] = calls.get((phase, op), 0) + n
    assert calls[("forward", "mm")] == 3
    assert calls[("backward", "mm")] == 5
    assert ("forward", "sum") in calls and ("backward", "sum") not in calls  # the loss's sum: forward only
    assert sum(v[0] for v in timer.stats.values()) <= wall
    shapes = {k[2] for k in timer.stats if k[:2] == ("forward", "mm")}
    assert shapes == {"[8, 32] [32, 32]"}


def test_op_times_report_on_a_tiny_model(capsys, tiny_config):
    from nanoseek import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (2, 32))
    _tool().op_times(model, ids, bf16=False, rows=5)
    out = capsys.readouterr().out
    assert out.startswith("fp32 step (CE only), batch (2, 32):")
    assert "| forward | `" in out and "| backward | `" in out
    assert all(p.grad is None for p in model.parameters())  # the tool leaves no gradients behind
    _tool().op_times(model, ids, bf16=False, rows=200, v4=True)   # the trainer's objective: MTP too
    out_v4 = capsys.readouterr().out
    assert out_v4.startswith("fp32 step (V4 objective), batch (2, 32):")
    ops = lambda text: int(text.split(" aten ops and C kernel calls")[0].rsplit(";", 1)[1])  # noqa: E731
    assert ops(out_v4) > ops(out)
    from nanoseek.model import cpu_kernels

    if cpu_kernels.available():   # the C kernels' calls are timed too (no dispatch mode sees them)
        assert "| forward | `C:" in out_v4 and "| backward | `C:" in out_v4
    assert cpu_kernels._library.__name__ == "_library"   # the timing proxy is removed afterwards


def test_switch_ab_times_only_the_named_switches_and_restores_them(capsys, tiny_config):
    from nanoseek import Transformer
    from nanoseek.model import hyper_connections as hc

    tool = _tool()
    torch.manual_seed(0)
    model = Transformer(tiny_config).train()
    ids = torch.randint(0, tiny_config.vocab_size, (1, 16))
    tool.switch_ab(model, ids, reps=1, only=["HyperConnection.stream_kernels"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert len(lines) == 1 and lines[0].split()[0] == "HyperConnection.stream_kernels"
    assert hc.HyperConnection.stream_kernels is True
    assert all(p.grad is None for p in model.parameters())


def test_process_ab_runs_each_mode_in_a_process_of_its_own(capsys):
    """--switches --processes: each mode measured by a child process of its own (whole runs, no
    step-by-step alternation), its median read back; the parent's switches stay untouched."""
    import argparse

    from nanoseek.model import moe

    tool = _tool()
    # (bf16: the children get --bf16 with --one-mode, which their argument check must accept)
    args = argparse.Namespace(preset="tiny", batch=1, seq=16, reps=1, bf16=True, threads=None, processes=1)
    tool.process_ab(args, ["Experts.fused"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("V4 objective forward + backward (bf16 autocast), batch (1, 16): each mode a process")
    name, *rest = out[1].split()
    assert name == "Experts.fused" and rest[0] == "off" and rest[3] == "on" and rest[6].endswith("x")
    assert float(rest[1]) > 0 and float(rest[4]) > 0
    assert moe.Experts.fused is True


def test_module_timer_puts_each_product_in_the_module_that_made_it():
    # a -> b -> c, bias-free linears: forward 1 product each; backward a weight gradient each and
    # an input gradient for b and c (a's input needs none) -- by the layer structure alone
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (nn.Linear(16, 16, bias=False) for _ in range(3))

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    net = Net()
    tool = _tool()
    timer = tool.ModuleTimer(net)
    with timer:
        loss = net(torch.randn(4, 16)).square().sum()
        timer.claim(loss, tool.OUTSIDE, 0)
        timer.phase = "backward"
        loss.backward()
    ops = {k: v[1] for k, v in timer.stats.items()}
    fwd = {k[1]: n for k, n in ops.items() if k[0] == "forward"}
    assert fwd.keys() == {"a", "b", "c", tool.OUTSIDE}         # OUTSIDE: the loss's square and sum
    assert fwd["a"] == fwd["b"] == fwd["c"]                    # one product (and its transpose) each
    back = {k[1]: n for k, n in ops.items() if k[0] == "backward"}
    assert back.keys() == {"a", "b", "c", tool.OUTSIDE}
    assert back["a"] < back["b"] == back["c"]                  # a has no input gradient to compute
    assert not timer.handles                                    # the hooks are gone after the mode


def test_by_module_report_on_a_tiny_model(capsys, tiny_config):
    from nanoseek import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_config).train()
    _tool().by_module(model, torch.randint(0, tiny_config.vocab_size, (2, 32)), bf16=False, rows=100, v4=True)
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = (float(cells[1]), float(cells[3]))
    assert {"layers.L.attn", "layers.L.ffn.experts", "mtp.L.attn", "hc_head", "(outside modules)"} <= rows.keys()
    names = {".".join("L" if p.isdigit() else p for p in n.split(".")) for n, _ in model.named_modules()}
    assert set(rows) - {"(outside modules)"} <= names
    backward = sum(b for _, b in rows.values())
    assert rows["(outside modules)"][1] < 0.5 * backward       # most backward time lands in the modules
    assert all(p.grad is None for p in model.parameters())
