"""The training loop (nanoseek/train/trainer.py): learning, bits-per-byte, exact resume, DDP,
router-bias balancing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.model import cpu_kernels
from nanoseek.model.moe import MoE
from nanoseek.train.checkpoint import latest_checkpoint, load_model_state, load_tree
from nanoseek.train.presets import scaled_model_config
from nanoseek.train.objectives import PretrainObjective
from nanoseek.train import parallelize
from nanoseek.train.trainer import Dist, TrainConfig, bits_per_byte_sums, evaluate_bpb, to_device, train

from .conftest import torchrun


def tiny_cfg(train_data, run_dir, **kw) -> TrainConfig:
    shards, tok = train_data
    base = dict(run_dir=str(run_dir), shard_dir=str(shards), tokenizer_dir=None, model="tiny", depth=None,
                seq_len=64, micro_batch=2, max_steps=4, lr=3e-3, warmup_steps=2, eval_every=0,
                progress=False, tensorboard=False, peak_tflops=1.0, sample_prompts=[])
    base.update(kw)
    return TrainConfig(**base)


def records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


# ------------------------------------------------------------------------- precision
@pytest.mark.parametrize("native", [True, False])
def test_autocast_auto_policy(monkeypatch, native):
    """--autocast auto: bf16 on CUDA; on a CPU only with native bf16 matmuls and from width 128
    (the depth dial's range, where it measured faster); "bf16" / "off" as said, whatever the machine."""
    from nanoseek.train import trainer

    monkeypatch.setattr(trainer, "fast_bf16_matmul", lambda device_type: native)
    narrow, wide = ModelConfig.from_preset("tiny"), ModelConfig.from_preset("small")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer.use_bf16_autocast("auto", cuda, narrow)
    assert not trainer.use_bf16_autocast("auto", cpu, narrow)
    assert trainer.use_bf16_autocast("auto", cpu, wide) is native
    assert wide.hidden_size >= trainer.CPU_BF16_MIN_WIDTH > narrow.hidden_size
    # every model of the depth dial (the speedrun's depth 3 included) takes bf16 there
    for depth in (2, 3):
        dial = scaled_model_config(depth=depth, vocab_size=4096, seq_len=256)
        assert trainer.use_bf16_autocast("auto", cpu, dial) is native
    for dev in (cpu, cuda):
        assert trainer.use_bf16_autocast("bf16", dev, narrow) and not trainer.use_bf16_autocast("off", dev, wide)
    # the LM head alone in bf16: where whole-model autocast is not chosen on a native-bf16 CPU
    assert trainer.use_bf16_head("auto", cpu, narrow) is native
    assert trainer.use_bf16_head("head", cpu, narrow) and not trainer.use_bf16_head("off", cpu, narrow)
    assert not trainer.use_bf16_autocast("head", cpu, wide)


def test_head_precision_run(train_data, tmp_path, monkeypatch):
    """--autocast head: the loss's LM head + CE in bf16 (Transformer.head_dtype), the rest fp32;
    the start record says so, and the run trains like the fp32 one (first loss within bf16
    rounding of it, and lower at the end)."""
    from nanoseek.train import trainer

    seen = {}
    real = trainer._wrap

    def spy(run):
        real(run)
        seen["head"], seen["param"] = run.model.head_dtype, run.model.head.weight.dtype

    monkeypatch.setattr(trainer, "_wrap", spy)
    train(tiny_cfg(train_data, tmp_path / "head", autocast="head", max_steps=6))
    assert seen == {"head": torch.bfloat16, "param": torch.float32}
    train(tiny_cfg(train_data, tmp_path / "fp32", autocast="off", max_steps=6))
    assert seen == {"head": None, "param": torch.float32}
    start = json.loads((tmp_path / "head" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["autocast"] == "head-bf16"
    with pytest.raises(ValueError, match=r"invalid TrainConfig: autocast='bf61' \(one of auto, bf16, head, off\)"):
        train(tiny_cfg(train_data, tmp_path / "typo", autocast="bf61"))
    h, f = records(tmp_path / "head"), records(tmp_path / "fp32")
    assert h[0]["ce"] != f[0]["ce"] and abs(h[0]["ce"] - f[0]["ce"]) < 0.02 * f[0]["ce"]
    assert h[-1]["ce"] < h[0]["ce"] - 0.3


# ------------------------------------------------------------------------- bits per byte

def test_bits_per_byte_hand_computed():
    token_bytes = torch.tensor([0, 0, 0, 0, 0, 3, 0, 1])          # id 5: 3 bytes, id 7: 1 byte, 0: special
    nats = torch.tensor([1.0, 2.0, 3.0, 4.0])
    targets = torch.tensor([5, 0, -100, 7])
    n, b = bits_per_byte_sums(nats, targets, token_bytes)
    # special (0-byte) and ignored targets leave both sums: (1 + 4) nats over (3 + 1) bytes
    assert float(n) == 5.0 and float(b) == 4.0
    assert float(n) / (math.log(2) * float(b)) == pytest.approx(5 / (4 * math.log(2)))


def test_evaluate_bpb_of_uniform_model():
    vocab = 8

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids, doc_ids=None):
            return torch.zeros(*ids.shape, vocab) + self.w

    token_bytes = torch.tensor([0, 1, 2, 3, 4, 1, 1, 2])
    labels = torch.tensor([[1, 2, 0, -100], [3, 4, 7, 5]])
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels}
    r = evaluate_bpb(Uniform(), [batch], token_bytes, Dist())
    n_text = 6                                       # targets with bytes: 1,2,3,4,7,5
    n_bytes = 1 + 2 + 3 + 4 + 2 + 1
    assert r["val_bpb"] == pytest.approx(n_text * math.log(vocab) / (math.log(2) * n_bytes), rel=1e-6)
    assert r["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)   # 7 supervised targets, all ln V
    assert r["val_tokens"] == 7


# ------------------------------------------------------------------------- learning

def test_loss_decreases_and_run_outputs(train_data, tmp_path):
    shards, tok = train_data
    cfg = tiny_cfg(train_data, tmp_path / "run", max_steps=12, tokenizer_dir=str(tok),
                   sample_prompts=["def alpha_1(beta, gamma):\n"], sample_tokens=8, indexer_warmup_steps=4)
    s = train(cfg)
    recs = records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 13))
    first, last = recs[0]["ce"], sum(r["ce"] for r in recs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    # V4 recipe bits visible in the log: indexer warm-up phase, MTP weight drop at decay start
    assert [r["dense_csa"] for r in recs[:5]] == [True] * 4 + [False]
    assert recs[0]["mtp_weight"] == 0.3 and recs[-1]["mtp_weight"] == 0.1
    assert all(r["mtp"] > 0 and r["indexer"] >= 0 and r["balance"] > 0 for r in recs)
    assert len(recs[-1]["expert_imbalance"]) == 4      # tiny: 3 learned-routing layers + the MTP block's
    assert 0 < s["val"]["val_bpb"] < 8 and s["val"]["val_tokens"] > 0
    assert isinstance(s["samples"]["def alpha_1(beta, gamma):\n"], str)
    # the checkpoint is a normal model directory, and the router bias moved (aux-loss-free update)
    m = Transformer.from_pretrained(s["checkpoint"])
    assert any(float(mod.gate.bias.abs().sum()) > 0 for mod in m.moe_layers() if not mod.is_hash)


# ------------------------------------------------------------------------- resume

class _Crash(PretrainObjective):
    def __call__(self, model, batch, phase):
        if phase["step"] == 4:
            raise RuntimeError("simulated crash")
        return super().__call__(model, batch, phase)


def test_resume_is_bitwise_identical(train_data, tmp_path):
    a, b = tmp_path / "straight", tmp_path / "crashed"
    train(tiny_cfg(train_data, a, max_steps=6, ckpt_every=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(train_data, b, max_steps=6, ckpt_every=3), objective=_Crash())
    assert latest_checkpoint(b).name == "step-00000003"
    train(tiny_cfg(train_data, b, max_steps=6, ckpt_every=3, resume=True))
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == list(range(1, 7))
    for x, y in zip(ra, rb):
        for k in ("loss", "ce", "mtp", "balance", "indexer", "grad_norm", "lr"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])        # bitwise, not approximately
        assert x["expert_load"] == y["expert_load"]
    sa, sb = load_model_state(latest_checkpoint(a)), load_model_state(latest_checkpoint(b))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta = load_tree(latest_checkpoint(a) / "train_state.safetensors")
    tb = load_tree(latest_checkpoint(b) / "train_state.safetensors")
    assert ta["loaders"] == tb["loaders"] and ta["trainer"]["tokens"] == tb["trainer"]["tokens"]


def test_compiled_training_follows_the_eager_run(train_data, tmp_path, monkeypatch):
    """`--compile BACKEND` trains through the compiled block halves (regional compile) and gives
    the eager run's loss trajectory. aot_eager keeps the test cheap: it traces forward and
    backward exactly as inductor does, without generating C++.

    Both runs use PyTorch's Sinkhorn: compiled graphs never call the eager C kernel
    (model/cpu_kernels.py), whose last-bit differences the indexer's top-k turns into a
    0.3% different indexer loss one optimizer step later (kernel vs PyTorch, both eager: step 1
    equal to 2e-7, step 2 2.8e-3). The kernel's own equivalence: tests/model/test_cpu_kernels.py."""
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    a, b = tmp_path / "eager", tmp_path / "compiled"
    train(tiny_cfg(train_data, a, max_steps=3, deterministic=True))
    s = train(tiny_cfg(train_data, b, max_steps=3, deterministic=True, compile="aot_eager"))
    ra, rb = records(a), records(b)
    assert [r["step"] for r in rb] == [1, 2, 3]
    for x, y in zip(ra, rb):
        for k in ("loss", "ce", "mtp", "balance", "indexer"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-5), (x["step"], k, x[k], y[k])
        assert x["expert_load"] == y["expert_load"]             # routing identical, step for step
    # the compiled run's checkpoint holds the eager run's weights (to float tolerance)
    sa, sb = load_model_state(latest_checkpoint(a)), load_model_state(latest_checkpoint(b))
    assert sa.keys() == sb.keys() and Path(s["checkpoint"]) == latest_checkpoint(b)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------- balancing

def test_bias_update_moves_load_toward_balance():
    cfg = ModelConfig.from_preset("tiny")
    moe = MoE(cfg, "moe").train()
    torch.manual_seed(0)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.02)
        moe.gate.weight[0] += 0.02           # skewed router: expert 0 attracts every token
        for p in list(moe.experts.parameters()) + list(moe.shared_experts.parameters()):
            p.normal_(0, 0.02)
    x = torch.randn(2, 64, cfg.hidden_size).abs()

    class Ctx:
        input_ids = None
        collect_balance = False
        token_mask = None

    def imbalance() -> float:
        with torch.no_grad():
            moe(x, Ctx())
        load = moe.load.clone()
        return float(load.max() / load.mean()), load

    before, load0 = imbalance()
    assert load0[0] == load0.max() and before > 2.5
    for _ in range(60):
        moe.update_bias(0.02)                 # uses and resets the accumulated load
        imbalance()
    after, _ = imbalance()
    assert after < before / 2, (before, after)
    assert float(moe.gate.bias[0]) < 0 < float(moe.gate.bias[1:].max())


# ------------------------------------------------------------------------- DDP

@pytest.fixture(scope="module")
def single_process_run(train_data, tmp_path_factory):
    """One process, global batch 256 tokens = 2 accumulation micro-steps of 2 x 64."""
    import torch as _torch

    n = _torch.get_num_threads()
    _torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("single")
    train(tiny_cfg(train_data, run, max_steps=4, batch_tokens=256, muon_ns_dtype="float32"))  # as the 2-process runs
    _torch.set_num_threads(n)
    return records(run)


@pytest.fixture(scope="module")
def single_process_run_pytorch_sinkhorn(train_data, tmp_path_factory):
    """single_process_run with the C kernels off: what a compiled run is compared with (its graphs
    run PyTorch's Sinkhorn; see test_compiled_training_follows_the_eager_run)."""
    n, was = torch.get_num_threads(), cpu_kernels.enabled
    torch.set_num_threads(1)
    cpu_kernels.enabled = False
    try:
        run = tmp_path_factory.mktemp("single_pytorch")
        train(tiny_cfg(train_data, run, max_steps=4, batch_tokens=256, muon_ns_dtype="float32"))
    finally:
        torch.set_num_threads(n)
        cpu_kernels.enabled = was
    return records(run)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-compile"])
def test_torchrun_two_processes_match_one(train_data, tmp_path, mode, request):
    """2 processes follow one. fsdp-compile: FSDP2 with the regional compile (aot_eager), whose
    compiled block halves run inside each block's call, after FSDP has gathered its parameters."""
    shards, _ = train_data
    single_process_run = request.getfixturevalue("single_process_run_pytorch_sinkhorn" if mode == "fsdp-compile"
                                                 else "single_process_run")
    common = ["--shards", str(shards), "--model", "tiny", "--seq-len", "64", "--micro-batch", "2",
              "--batch-tokens", "256", "--steps", "4", "--lr", "3e-3", "--warmup-steps", "2",
              "--eval-every", "0", "--peak-tflops", "1", "--no-progress",
              # fp32 Newton-Schulz: bf16's rounding would magnify the sharded/unsharded gradient
              # differences (sums in another order) past the tolerance within 4 steps
              "--muon-ns-dtype", "float32"]
    args = ["train", "--out", str(tmp_path / "ddp"), *common]
    if mode.startswith("fsdp"):
        args.append("--fsdp")                              # parameters/grads/optimizer state sharded
    env = {}
    if mode == "fsdp-compile":
        args += ["--compile", "aot_eager"]
        env["NANOSEEK_CPU_KERNELS"] = "0"
    r = torchrun(args, tmp_path, {"ddp": 29517, "fsdp": 29518, "fsdp-compile": 29519}[mode], timeout=240, **env)
    assert "returned a view tensor" not in r.stderr     # FSDP2's warning for a block output that is a view
    assert "torch.compile of the model failed" not in r.stderr   # (the compiled halves ran; no eager fallback)
    # one process, same global batch: its 2 accumulation micro-steps read the two ranks' data shards
    rd, rs = records(tmp_path / "ddp"), single_process_run
    assert len(rd) == len(rs) == 4
    for x, y in zip(rd, rs):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)
        for term in ("indexer", "balance"):                # per-block FSDP units keep every aux term
            assert x[term] == pytest.approx(y[term], rel=1e-4, abs=1e-6)
        assert x["expert_load"] == y["expert_load"]      # all-reduced load = one process' load
    # the ranks end through exit_after_distributed: rank 0's last line still reaches its stdout
    assert "done: 4 steps" in r.stdout, r.stdout[-500:]
    # written once (rank 0) and loadable in one process: as a model, and to resume the run
    ckpt = latest_checkpoint(tmp_path / "ddp")
    assert ckpt.name == "step-00000004"
    Transformer.from_pretrained(ckpt)
    s = train(tiny_cfg(train_data, tmp_path / "ddp", max_steps=5, batch_tokens=256, resume=True))
    assert s["steps"] == 5 and [r["step"] for r in records(tmp_path / "ddp")] == [1, 2, 3, 4, 5]


def test_a_torchrun_command_ends_without_interpreter_teardown(monkeypatch, capsys):
    """A command that shut down its own torchrun group ends with os._exit(its exit code) once it
    has returned (parallelize.exit_after_distributed: gloo's worker threads can otherwise abort
    the process during finalization); output written before is flushed; nothing else exits
    early: a process without such a group, or an in-process call of the program (argv given)."""
    import sys

    from nanoseek import cli
    from nanoseek.train import parallelize as par

    exits = []
    monkeypatch.setattr(par.os, "_exit", exits.append)
    par.exit_after_distributed(3)
    assert exits == []                                   # no group was ended here
    monkeypatch.setattr(par, "_ended_group", True)
    flushed = []
    monkeypatch.setattr(sys.stdout, "flush", lambda: flushed.append("out"))
    par.exit_after_distributed(3)
    assert exits == [3] and flushed == ["out"]
    exits.clear()
    assert cli.main(["info", "tiny"]) == 0 and exits == []          # in-process: never
    monkeypatch.setattr(sys, "argv", ["nanoseek", "info", "tiny"])
    assert cli.main() == 0 and exits == [0]                          # the program itself: its code
    monkeypatch.setattr(cli, "_run", lambda args: 5)                 # a failing command's code
    assert cli.main() == 5 and exits == [0, 5]
    capsys.readouterr()


def test_batches_reach_the_device_with_their_nested_stats():
    """RL / distillation batches carry per-batch stats (a dict of scalars) that the objective
    returns among its terms: they must reach the device too, or a single-GPU run's term meter
    stacks CUDA and CPU scalars (DDP moves nested inputs itself, a lone process does not)."""
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "stats": {"reward": torch.tensor(0.5)},
             "rows": [torch.ones(1), (torch.ones(2), "tag")], "n": 3}
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].is_meta and moved["stats"]["reward"].is_meta
    assert moved["rows"][0].is_meta and moved["rows"][1][0].is_meta and moved["rows"][1][1] == "tag"
    assert moved["n"] == 3 and isinstance(moved["rows"][1], tuple)


def test_gpu_process_group_takes_cpu_tensors_too(monkeypatch):
    """Under torchrun on GPUs the run's bookkeeping collectives reduce small CPU tensors (the
    metrics' all-reduce, the time budget's max, rollout counts), which an NCCL-only process group
    refuses: the group is NCCL for CUDA tensors and gloo for CPU ones. (No GPU here: the init is
    captured, not run.)"""
    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.append(backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(parallelize, "_owned_group", False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = parallelize.setup_distributed("cuda")
    assert d.device == torch.device("cuda", 1) and seen == ["cpu:gloo,cuda:nccl"]
    parallelize.setup_distributed("cpu")
    assert seen[-1] == "gloo"
    monkeypatch.setattr(parallelize, "_owned_group", False)   # (nothing was made: nothing to tear down)


def test_a_time_budget_follows_the_step_time_until_the_decay_then_stays():
    """--minutes: the horizon is re-estimated from recent step times while the LR is constant, so
    steps that slow down (here from 0.1 to 0.2 s) still end near the budget, with the decay; once
    the decay has begun the horizon no longer moves. A --max-steps run is never touched."""
    from types import SimpleNamespace

    from nanoseek.train.optim import decay_start
    from nanoseek.train.parallelize import Dist
    from nanoseek.train.trainer import TrainState, _fix_horizon

    def run_budget(times, **cfg):
        cfg = SimpleNamespace(**{"max_steps": None, "minutes": 1.0, "calibrate_steps": 3, "decay_frac": 0.2, **cfg})
        run = SimpleNamespace(state=TrainState(total_steps=cfg.max_steps), cfg=cfg, dist=Dist())
        st, seen, fixed_at = run.state, [], None
        while st.total_steps is None or st.step < st.total_steps:
            dt = times(st.step)
            st.step += 1
            st.train_seconds += dt
            _fix_horizon(run, dt, seen, None)
            if st.horizon_fixed and fixed_at is None:
                fixed_at = (st.step, st.total_steps)
        return st, fixed_at

    st, (step, total) = run_budget(lambda i: 0.1 if i < 100 else 0.2)
    assert abs(st.train_seconds - 60) < 3            # fixed after 3 steps: 600 steps, 110 s
    assert st.total_steps == total and step == decay_start(total, 0.2)   # fixed as the decay begins
    st, _ = run_budget(lambda i: 0.1)
    assert 590 <= st.total_steps <= 601 and abs(st.train_seconds - 60) < 1
    st, fixed_at = run_budget(lambda i: 0.1, max_steps=50)
    assert st.total_steps == st.step == 50 and fixed_at is None and st.train_seconds == pytest.approx(5.0)
