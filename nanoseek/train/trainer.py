"""The one training loop of nanoseek: pre-training today, SFT / RL / distillation by objective.

    nanoseek train --shards runs/shards --tokenizer runs/tokenizer --depth 4 --minutes 10 --out runs/pt
    torchrun --nproc-per-node 2 -m nanoseek.cli train ...            # DDP (gloo on CPU, nccl on GPU)
    >>> from nanoseek.train.trainer import TrainConfig, train
    >>> summary = train(TrainConfig(shard_dir=..., tokenizer_dir=..., run_dir=..., max_steps=100))

The DeepSeek-V4 recipe (spec section 3; V4 report sections 2.4 and 4.2):
  * Muon for matrices + AdamW for embedding/head/norms/mHC biases and gates (optim.py);
  * warm-up -> constant -> decay (cosine to 10% of the peak by default);
  * MTP loss weight 0.3, lowered to 0.1 when the LR decay starts;
  * sequence-wise balance loss (alpha = 1e-4) + the auxiliary-loss-free router-bias update
    after every optimizer step (load summed over data-parallel ranks first);
  * indexer warm-up: dense attention over all compressed entries (model.dense_csa) for the
    first `indexer_warmup_steps` steps, sparse top-k afterwards; the indexer KL loss trains
    the indexer in both phases.
Engineering: gradient accumulation to a token batch size, gradient clipping, bf16 autocast
on CUDA (off on CPU, where bf16 matmul is ~100x slower than fp32 on machines without bf16
units), optional torch.compile, validation bits-per-byte, greedy sample generations, a live
tqdm bar, JSONL (+ TensorBoard if installed) metrics with MFU and expert-load imbalance, and
atomic checkpoints with exact resume (checkpoint.py).

Data parallelism. With W ranks and A accumulation micro-steps the global batch is made of
D = W * A "data ranks": micro-step k of rank r reads TokenLoader shard r*A + k of D. A
single process with A = 2 therefore sees exactly the data that 2 processes with A = 1 see,
and their loss curves agree to float rounding (tested). Resuming needs the same D; a
different D restarts the data stream (with a warning) but keeps model and optimizer.

`--fsdp` (FSDP2 `fully_shard`, one unit per block + the root) replaces DDP for models that do not fit
one device: parameters, gradients and optimizer state are sharded; Muon gathers each sharded
matrix's update for Newton-Schulz (optim.py); checkpoints gather full tensors and are the
same files as unsharded runs, so they load at any world size with or without FSDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.eval.bpb import bits_per_byte_sums
from nanoseek.train.checkpoint import latest_checkpoint, load_model_state, load_tree, save_checkpoint
from nanoseek.train.objectives import Objective, PretrainObjective
from nanoseek.train.optim import OptimConfig, build_optimizer, decay_start, lr_schedule

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    # --- where ---
    run_dir: str = "runs/train"
    shard_dir: str = "runs/shards"
    tokenizer_dir: str | None = None          # for bits-per-byte and samples (recommended)
    # --- model: a config.json / checkpoint dir, a preset name, or the depth dial ---
    model: str | None = None                  # preset name ("tiny", "small", ...) or a directory
    depth: int | None = 4                     # used when `model` is None (presets.py)
    init_from: str | None = None              # start from these weights (a checkpoint dir)
    # --- batch ---
    seq_len: int = 256
    micro_batch: int = 8                      # rows per micro-step per rank
    batch_tokens: int | None = None           # global tokens per optimizer step (None: one micro-step)
    # --- horizon ---
    max_steps: int | None = None
    minutes: float | None = None              # training-time budget (eval/sampling excluded)
    calibrate_steps: int = 3                  # steps timed before the budget fixes max_steps
    # --- optimisation ---
    lr: float | None = None                   # None: from the depth dial (presets.py), else 2e-3
    adamw_lr: float | None = None
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    decay_frac: float = 0.2                   # the last 20% of steps decay
    decay_shape: str = "cosine"               # cosine | linear (WSD)
    final_lr_frac: float = 0.1
    grad_clip: float = 1.0
    # --- losses (spec 3) ---
    mtp_weight: float = 0.3
    mtp_weight_decay: float = 0.1             # after the LR decay starts
    balance_alpha: float = 1e-4
    indexer_weight: float = 1.0
    indexer_warmup_steps: int = 0             # dense CSA for the first N steps
    bias_update_speed: float = 1e-3
    # --- data ---
    fim_rate: float = 0.0
    seed: int = 0
    # --- evaluation / logging ---
    eval_every: int = 100
    eval_tokens: int = 65536
    sample_every: int = 0                     # 0: only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["def fibonacci(n):\n"])
    sample_tokens: int = 48
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True                  # if the `tensorboard` package is installed
    peak_tflops: float | None = None          # None: measured with a matmul benchmark
    # --- checkpoints ---
    ckpt_every: int = 0                       # 0: only at the end
    keep_last: int = 3
    resume: bool = False
    # --- systems ---
    device: str = "auto"                      # auto | cpu | cuda
    autocast: str = "auto"                    # auto (bf16 on CUDA, off on CPU) | bf16 | off
    compile: bool | str = False               # True / "inductor", or another torch.compile backend name
    deterministic: bool = False
    find_unused_parameters: bool = False
    fsdp: bool = False                        # under torchrun: FSDP2 fully_shard instead of DDP

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Distributed helpers

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def _all_reduce(t: torch.Tensor, d: Dist, op=None) -> torch.Tensor:
    if d.enabled:
        torch.distributed.all_reduce(t, op=op or torch.distributed.ReduceOp.SUM)
    return t


# ---------------------------------------------------------------------------------------------
# Metrics pieces (pure functions: tested on their own)
# bits_per_byte_sums lives with the bpb evaluation task (nanoseek/eval/bpb.py): one definition of bpb

@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches, token_bytes: torch.Tensor, d: Dist | None = None,
                 autocast=contextlib.nullcontext) -> dict:
    """Validation loss (nats/token over all supervised targets) and bits-per-byte."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # nats(bpb), bytes, nats(all), tokens(all)
    for batch in batches:
        ids, labels = batch["input_ids"].to(d.device), batch["labels"].to(d.device)
        doc_ids = batch["doc_ids"].to(d.device) if batch.get("doc_ids") is not None else None
        with autocast():
            logits = model(ids, doc_ids=doc_ids)
        nats = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none")
        n, b = bits_per_byte_sums(nats, labels, token_bytes)
        sums += torch.stack([n.cpu(), b.cpu(), nats.double().sum().cpu(),
                             (labels != IGNORE_INDEX).sum().double().cpu()])
    model.train(was_training)
    _all_reduce(sums, d)
    bpb = float(sums[0] / (math.log(2) * sums[1])) if sums[1] > 0 else float("nan")
    loss = float(sums[2] / sums[3]) if sums[3] > 0 else float("nan")
    return {"val_bpb": bpb, "val_loss": loss, "val_tokens": int(sums[3])}


@torch.no_grad()
def greedy_complete(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation with the decode cache (a deliberately simple loop; nanoseek.engine
    has the full sampler)."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(torch.tensor([ids], device=dev), cache=cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt == tokenizer.eos_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=dev), cache=cache)
    model.train(was_training)
    return tokenizer.decode(out)


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Achievable matmul FLOP/s on this device (the MFU denominator when none is configured)."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    (a @ b).sum().item()
    iters, t0 = 0, time.perf_counter()
    while True:
        c = a @ b
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt > seconds:
            break
    del c
    return 2 * n**3 * iters / dt


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6 x (activated non-embedding parameters, MTP included) + attention scores (12 L h d_h T/2
    would be the dense count; V4 layers attend to a window + compressed entries, so we count
    the window only -- a lower bound)."""
    c = model.config
    n = 0
    for name, p in model.named_parameters():
        if name == "embed.weight":
            continue
        k = p.numel()
        if ".experts.w" in name:
            k = k // c.n_routed_experts * c.num_experts_per_tok
        n += k
    layers = c.num_hidden_layers + len(c.mtp_layer_types)
    attn = 12 * layers * c.num_attention_heads * c.head_dim * min(seq_len, c.sliding_window) / 2
    return 6 * n + attn


# ---------------------------------------------------------------------------------------------
# Logging

class MetricsLog:
    """metrics.jsonl (+ TensorBoard when available); main rank only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # drop records written after the checkpoint we resume from: the curve stays one curve
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is an optional extra
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class _ObjectiveModule(nn.Module):
    """Model + objective as one module, so DDP's forward hooks see the whole loss computation."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, *args, _call: str | None = None, **kw):
        if _call == "model":   # plain model call (logits / decoding) through the FSDP root
            return self.model(*args, **kw)
        batch, phase = args
        return self.objective(self.model, batch, phase)


class _RootCall(nn.Module):
    """Looks like the model for evaluation and sampling, but calls through the FSDP root so the
    root-level parameters (embedding, head) are gathered."""

    def __init__(self, root: nn.Module, model: nn.Module):
        super().__init__()
        self.root = root
        self._model = [model]  # a list: not registered twice as a submodule

    def forward(self, input_ids, cache=None, doc_ids=None):
        return self.root(input_ids, cache=cache, doc_ids=doc_ids, _call="model")

    def new_cache(self, *args, **kw):
        return self._model[0].new_cache(*args, **kw)


def _optimizer_params(opt) -> list[list[torch.Tensor]]:
    """Per optimizer, its parameters in state_dict index order."""
    return [[p for g in o.param_groups for p in g["params"]] for o in opt.optimizers]


def _map_optimizer_tensors(states: list[dict], opt, fn) -> list[dict]:
    """Apply fn(tensor, param) to every per-parameter state tensor of CombinedOptimizer states."""
    out = []
    for sd, params in zip(states, _optimizer_params(opt)):
        new_state = {i: {k: fn(v, params[i]) if isinstance(v, torch.Tensor) else v for k, v in ps.items()}
                     for i, ps in sd["state"].items()}
        out.append({**sd, "state": new_state})
    return out


def _shard_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "device_mesh") and tuple(t.shape) == tuple(p.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
    return t


def _unshard(t: torch.Tensor, p=None) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _FullModelView:
    """What save_pretrained needs of a model (config, dtype, state_dict) built from a full
    state dict: lets rank 0 save an FSDP-sharded model without materialising a second copy
    of the module."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state
        self.embed = type("E", (), {"weight": state["embed.weight"]})()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state

    def save_pretrained(self, path) -> None:
        from nanoseek.checkpoint import save_pretrained

        save_pretrained(self, path)


# ---------------------------------------------------------------------------------------------
# Model construction

def build_model_config(cfg: TrainConfig, vocab_size: int):
    from nanoseek.config import PRESETS, ModelConfig
    from nanoseek.train.presets import scaled_model_config

    if cfg.model and Path(cfg.model).is_dir():
        mc = ModelConfig.from_json(cfg.model)
    elif cfg.model:
        if cfg.model not in PRESETS:
            raise ValueError(f"unknown model {cfg.model!r}: not a directory and not a preset ({', '.join(PRESETS)})")
        mc = ModelConfig.from_preset(cfg.model)
    elif cfg.depth:
        mc = scaled_model_config(cfg.depth, vocab_size, cfg.seq_len)
    else:
        raise ValueError("give a model (preset or directory) or a depth")
    if mc.vocab_size != vocab_size:
        if cfg.model and Path(cfg.model).is_dir():
            raise ValueError(f"model vocabulary {mc.vocab_size} != shard vocabulary {vocab_size}")
        mc = mc.replace(vocab_size=vocab_size)
    if mc.max_position_embeddings < cfg.seq_len:
        mc = mc.replace(max_position_embeddings=cfg.seq_len)
    return mc


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """Fill LR / warm-up / batch from the depth dial where the user left them unset."""
    from nanoseek.train.presets import scaled_train_defaults

    dial = scaled_train_defaults(cfg.depth, cfg.seq_len) if (cfg.depth and not cfg.model) else \
        {"lr": 2e-3, "batch_tokens": None, "warmup_steps": 20}
    changes = {}
    if cfg.lr is None:
        changes["lr"] = dial["lr"]
    if cfg.warmup_steps is None:
        changes["warmup_steps"] = dial["warmup_steps"]
    if cfg.batch_tokens is None and dial["batch_tokens"]:
        changes["batch_tokens"] = dial["batch_tokens"]
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, objective: Objective | None = None) -> dict:
    """Train per `cfg`; return a summary dict (also written to RUN/summary.json)."""
    from nanoseek.data.shards import TokenLoader, load_index
    from nanoseek.model import Transformer

    cfg = resolve_defaults(cfg)
    d = setup_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.max_steps is None and cfg.minutes is None:
        raise ValueError("give max_steps or minutes")
    index = load_index(cfg.shard_dir)
    vocab = int(index["vocab_size"])
    mc = build_model_config(cfg, vocab)

    # --- batch geometry ---
    rows_tokens = cfg.micro_batch * cfg.seq_len
    batch_tokens = cfg.batch_tokens or rows_tokens * d.world
    per_step = rows_tokens * d.world
    if batch_tokens % per_step:
        raise ValueError(f"batch_tokens {batch_tokens} is not a multiple of micro_batch*seq_len*world = {per_step}")
    accum = batch_tokens // per_step
    n_data = d.world * accum

    # --- model and optimizer ---
    torch.manual_seed(cfg.seed)
    model = Transformer(mc)
    if cfg.init_from:
        model.load_state_dict(load_model_state(cfg.init_from), strict=False)
    model.to(d.device).train()
    fsdp = cfg.fsdp and d.enabled

    def make_loader(i: int, seed: int) -> TokenLoader:
        return TokenLoader(cfg.shard_dir, "train", cfg.micro_batch, cfg.seq_len, rank=i, world_size=n_data,
                           seed=seed, fim_rate=cfg.fim_rate)

    data_seed = cfg.seed
    loaders = [make_loader(d.rank * accum + k, data_seed) for k in range(accum)]

    st = {"step": 0, "tokens": 0, "total_steps": cfg.max_steps, "train_seconds": 0.0}
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                              f"or choose another --out")
    tree = None
    if resume_from is not None:
        tree = load_tree(resume_from / "train_state.safetensors")
        model.load_state_dict(load_model_state(resume_from), strict=True)
        st = dict(tree["trainer"])
        if cfg.max_steps is not None:
            st["total_steps"] = cfg.max_steps
        if tree["data_ranks"] == n_data:
            for k, ld in enumerate(loaders):
                ld.load_state_dict(tree["loaders"][d.rank * accum + k])
        else:
            warnings.warn(f"checkpoint was written with {tree['data_ranks']} data ranks, now {n_data}: "
                          f"the data stream restarts (seeded by the step)", stacklevel=2)
            data_seed = cfg.seed + st["step"]
            loaders = [make_loader(d.rank * accum + k, data_seed) for k in range(accum)]
        torch.set_rng_state(tree["rng"]["cpu"])
        if d.device.type == "cuda" and "cuda" in tree["rng"]:
            torch.cuda.set_rng_state(tree["rng"]["cuda"])
        if d.is_main and cfg.progress:
            print(f"resumed from {resume_from} (step {st['step']})", file=sys.stderr)

    objective = objective or PretrainObjective(cfg.balance_alpha, cfg.indexer_weight)
    module: nn.Module = _ObjectiveModule(model, objective)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP2, one unit per block (main and MTP) plus the root (the objective wrapper, whose
        # forward calls model.loss): only one block's parameters are gathered at a time.
        # The auxiliary loss terms travel in ForwardContext.aux, an opaque object that FSDP's
        # argument rebuilding passes by reference, so every block's terms reach the loss.
        for block in list(model.layers) + list(model.mtp):
            fully_shard(block)
        fully_shard(module)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # broadcast_buffers=False: gate.bias is a buffer kept identical by the all-reduced
        # load (every rank applies the same update), and `load` itself must stay per rank
        unused = cfg.find_unused_parameters or cfg.mtp_weight == 0 or cfg.indexer_weight == 0
        module = DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                     broadcast_buffers=False, find_unused_parameters=unused)
    if cfg.compile and fsdp:
        # the compiled block halves are called directly (Block.front / Block.back), bypassing the
        # pre-forward hook through which FSDP2 gathers a block's sharded parameters
        raise ValueError("--compile together with --fsdp is not supported (use DDP, or drop --compile)")
    if cfg.compile:
        # regional compilation (torchtitan-style, per block): one compiled function for all
        # blocks, so compile time scales with the number of block kinds, not with depth; the
        # MoE grouped expert pass stays eager (data-dependent shapes). See docs/model.md.
        model.compile_blocks(backend="inductor" if cfg.compile is True else str(cfg.compile))
    # built after wrapping: FSDP2 replaces the parameters by sharded DTensors
    opt = build_optimizer(model, OptimConfig(lr=cfg.lr, adamw_lr=cfg.adamw_lr, weight_decay=cfg.weight_decay))
    if tree is not None:
        opt.load_state_dict(_map_optimizer_tensors(tree["optimizer"], opt, _shard_like) if fsdp else tree["optimizer"])
    eval_model: nn.Module = _RootCall(module, model) if fsdp else model
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and d.device.type == "cuda")

    def autocast():
        return torch.autocast(d.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    tok = None
    token_bytes = None
    if cfg.tokenizer_dir:
        from nanoseek.data.tokenizer import load_tokenizer

        tok = load_tokenizer(cfg.tokenizer_dir)
        if tok.vocab_size != vocab:
            raise ValueError(f"tokenizer vocabulary {tok.vocab_size} != shard vocabulary {vocab}")
        token_bytes = torch.as_tensor(tok.token_byte_lengths(), device=d.device)

    log = MetricsLog(run_dir, d.is_main, cfg.tensorboard, st["step"] if resume_from is not None else None)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:   # a fresh run: no samples or summary of an earlier attempt
            for stale in ("samples.jsonl", "summary.json"):
                (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    flops_tok = training_flops_per_token(model, cfg.seq_len)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else \
        measure_peak_flops(d.device, torch.bfloat16 if use_bf16 else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if d.is_main:
        log.write({"event": "start", "step": st["step"], "params": n_params,
                   "activated_params": model.num_parameters(activated=True), "flops_per_token": flops_tok,
                   "peak_flops": peak, "batch_tokens": batch_tokens, "accum": accum, "world": d.world,
                   "device": str(d.device), "autocast": "bf16" if use_bf16 else "off"})

    def val_batches():
        ld = TokenLoader(cfg.shard_dir, "val", cfg.micro_batch, cfg.seq_len, rank=d.rank, world_size=d.world,
                         shuffle=False, loop=False)
        limit = max(1, cfg.eval_tokens // (rows_tokens * d.world))
        for i, b in enumerate(ld):
            if i >= limit:
                break
            yield b

    def run_eval(step: int) -> dict | None:
        if token_bytes is None or "val" not in index["splits"] or index["splits"]["val"]["docs"] < d.world:
            return None
        t0 = time.perf_counter()
        r = evaluate_bpb(eval_model, val_batches(), token_bytes, d, autocast)
        r.update(step=step, event="eval", seconds=round(time.perf_counter() - t0, 2))
        if d.is_main:
            log.write(r)
        return r

    def run_samples(step: int) -> list[str]:
        if tok is None or not (d.is_main or fsdp):   # FSDP: every rank takes part in the forwards
            return []
        outs = []
        for p in cfg.sample_prompts:
            with autocast():
                text = greedy_complete(eval_model, tok, p, cfg.sample_tokens)
            outs.append(text)
            if not d.is_main:
                continue
            with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "prompt": p, "completion": text}) + "\n")
        return outs

    def save(step: int) -> None:
        states = [ld.state_dict() for ld in loaders]
        if d.enabled:
            gathered: list = [None] * d.world
            torch.distributed.all_gather_object(gathered, states)
            states = [s for rank_states in gathered for s in rank_states]
        optim_state = opt.state_dict()
        to_save = model
        if fsdp:   # gather full tensors (collective: every rank), rank 0 writes them
            optim_state = _map_optimizer_tensors(optim_state, opt, _unshard)
            full = {k: _unshard(v) for k, v in model.state_dict().items()}
            to_save = _FullModelView(model.config, full)
        if d.is_main:
            rng = {"cpu": torch.get_rng_state()}
            if d.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            tree = {"trainer": dict(st), "optimizer": optim_state, "loaders": states, "data_ranks": n_data,
                    "rng": rng, "config": json.loads(json.dumps(cfg.to_json()))}
            save_checkpoint(run_dir, step, to_save, tree, keep_last=cfg.keep_last)
        if d.enabled:
            torch.distributed.barrier()

    # --- the loop ---
    bar = None
    if d.is_main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=st["total_steps"], initial=st["step"], desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    moe = [m for m in model.moe_layers() if not m.is_hash]
    step_times: list[float] = []
    last_eval = None
    rec: dict = {}
    t_run = time.perf_counter()
    try:
        while st["total_steps"] is None or st["step"] < st["total_steps"]:
            step = st["step"]
            total = st["total_steps"] or 10**12
            t0 = time.perf_counter()
            model.dense_csa = step < cfg.indexer_warmup_steps
            # a short run (or a small time budget) never spends more than a fifth of it warming up
            warmup = min(cfg.warmup_steps, max(1, total // 5))
            mult = lr_schedule(step, total, warmup_steps=warmup, decay_frac=cfg.decay_frac,
                               shape=cfg.decay_shape, final_frac=cfg.final_lr_frac)
            opt.set_lr_mult(mult)
            in_decay = st["total_steps"] is not None and step >= decay_start(total, cfg.decay_frac)
            phase = {"step": step, "mtp_weight": cfg.mtp_weight_decay if in_decay else cfg.mtp_weight}
            terms_sum: dict[str, torch.Tensor] = {}
            for k, ld in enumerate(loaders):
                batch = {n: v.to(d.device) for n, v in next(ld).items()}
                last = k == accum - 1
                if fsdp:
                    module.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if (not d.enabled or fsdp or last) else module.no_sync()
                with sync:
                    with autocast():
                        terms = module(batch, phase)
                    (terms["loss"] / accum).backward()
                for n, v in terms.items():
                    terms_sum[n] = terms_sum.get(n, 0.0) + v.detach().float() / accum
            # aux-loss-free balancing: sum the routed load over ranks, then every rank applies
            # the same sign update to its copy of gate.bias
            loads = None
            if moe:
                loads = torch.stack([m.load for m in moe])
                _all_reduce(loads, d)
                for m, l in zip(moe, loads):
                    m.load.copy_(l)
            gnorm = _unshard(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                            cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_router_bias(cfg.bias_update_speed)
            names = sorted(terms_sum)
            vec = torch.stack([terms_sum[n].reshape(()) for n in names]).cpu().double()
            _all_reduce(vec, d)
            vec /= d.world
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            st["step"] = step + 1
            st["tokens"] += batch_tokens
            st["train_seconds"] += dt

            # time budget: after a few timed steps, fix the horizon (deterministic from then on)
            if st["total_steps"] is None:
                if step >= 1:
                    step_times.append(dt)
                over = torch.tensor([float(st["train_seconds"] >= cfg.minutes * 60)], dtype=torch.float64)
                _all_reduce(over, d, torch.distributed.ReduceOp.MAX if d.enabled else None)
                if bool(over.item()):          # budget spent before calibration finished: stop here
                    st["total_steps"] = st["step"]
                elif len(step_times) >= cfg.calibrate_steps:
                    mean = sum(step_times) / len(step_times)
                    remaining = cfg.minutes * 60 - st["train_seconds"]
                    n = torch.tensor([st["step"] + max(1, int(remaining / mean))], dtype=torch.float64)
                    _all_reduce(n, d, torch.distributed.ReduceOp.MAX if d.enabled else None)
                    st["total_steps"] = int(n.item())
                    if bar is not None:
                        bar.total = st["total_steps"]
                        bar.refresh()

            rec = {"step": st["step"], "tokens": st["tokens"], "lr": opt.param_groups[0]["lr"],
                   "grad_norm": float(gnorm), "dt": round(dt, 4), "tok_per_s": round(batch_tokens / dt, 1),
                   "mfu": flops_tok * batch_tokens / dt / peak, "dense_csa": model.dense_csa,
                   "mtp_weight": phase["mtp_weight"]}
            rec.update({n: float(v) for n, v in zip(names, vec)})
            if loads is not None:
                mean_l = loads.mean(dim=1).clamp_min(1e-9)
                rec["expert_imbalance"] = [round(float(x), 4) for x in loads.max(dim=1).values / mean_l]
                rec["expert_load"] = [[int(x) for x in row] for row in loads.tolist()]
            if d.is_main and (st["step"] % cfg.log_every == 0 or st["step"] == st["total_steps"]):
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                                refresh=False)
            done = st["total_steps"] is not None and st["step"] >= st["total_steps"]
            if cfg.eval_every and st["step"] % cfg.eval_every == 0 and not done:
                last_eval = run_eval(st["step"])
                if bar is not None and last_eval:
                    bar.write(f"step {st['step']}: val bpb {last_eval['val_bpb']:.4f}")
            if cfg.sample_every and st["step"] % cfg.sample_every == 0 and not done:
                for s in run_samples(st["step"]):
                    if bar is not None:
                        bar.write(f"step {st['step']} sample: {s!r}")
            if cfg.ckpt_every and st["step"] % cfg.ckpt_every == 0 and not done:
                save(st["step"])
    finally:
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t_run
    last_eval = run_eval(st["step"]) or last_eval
    samples = run_samples(st["step"])
    save(st["step"])
    summary = {"steps": st["step"], "tokens": st["tokens"], "train_seconds": round(st["train_seconds"], 2),
               "wall_seconds": round(wall, 2), "params": n_params,
               "activated_params": model.num_parameters(activated=True),
               "final_loss": rec.get("loss"),
               "val": last_eval, "samples": dict(zip(cfg.sample_prompts, samples)),
               "tok_per_s": round(st["tokens"] / max(st["train_seconds"], 1e-9), 1),
               "mfu": flops_tok * st["tokens"] / max(st["train_seconds"], 1e-9) / peak,
               "world": d.world, "checkpoint": str(latest_checkpoint(run_dir)) if d.is_main else None}
    if d.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.write({"event": "end", "step": st["step"], **{k: v for k, v in summary.items() if k in ("tokens", "train_seconds", "tok_per_s", "mfu")}})
    log.close()
    return summary
