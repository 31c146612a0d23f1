"""The one training loop of nanoseek: pre-training, SFT, RL and distillation are objectives on it.

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
on CUDA and on CPUs with native bf16 matmuls for models of width >= 128 (`use_bf16_autocast`;
narrower models there run only the LM head + CE in bf16, `use_bf16_head`; fp32 elsewhere:
bf16 matmul is ~100x slower than fp32 on CPUs without bf16 units), optional
torch.compile, validation bits-per-byte, greedy sample generations, a live
tqdm bar, JSONL (+ TensorBoard if installed) metrics with MFU and expert-load imbalance, and
atomic checkpoints with exact resume (checkpoint.py).

Shape (torchtitan's): `train(cfg, objective)` = `setup` (model, data, optimizer, resume,
wrapping: a `Run`) then a loop over `train_step(run, micro_batches) -> terms`, with the
counters in a `TrainState` dataclass. The objective (objectives.py) supplies the batches, the
loss and its metrics; parallelize.py the DDP / FSDP2 wrapping and gathered checkpoints;
metrics.py MFU, tokens/s and the loss-term bookkeeping. At the end a self-contained model
directory (weights, config, tokenizer, generation_config.json) is written to RUN/model.

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
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nanoseek._runtime import keep_freed_memory
from nanoseek.train.config_checks import FLOAT, INT, check_ranges
from nanoseek.eval.bpb import bits_per_byte_sums  # noqa: F401  (re-exported: one definition of bpb)
from nanoseek.eval.bpb import evaluate_bpb as eval_bpb
from nanoseek.train.checkpoint import (latest_checkpoint, latest_intact_checkpoint, load_model_state, load_tree,
                                       save_checkpoint)
from nanoseek.train.metrics import (MetricsLog, TermMeter, expert_load_metrics, measure_peak_flops,  # noqa: F401
                                    training_flops_per_token)
from nanoseek.train.objectives import Objective, PretrainObjective
from nanoseek.train.optim import OptimConfig, build_optimizer, decay_start, fast_bf16_matmul, lr_schedule
from nanoseek.train.parallelize import (Dist, all_reduce, all_reduce_max, barrier, gather_objects,  # noqa: F401
                                        gathered_state, load_optimizer_state, no_sync, parallelize, setup_distributed,
                                        unshard)


AUTOCAST_SETTINGS = ("auto", "bf16", "head", "off")   # --autocast


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
    calibrate_steps: int = 3                  # steps timed before the horizon's first estimate (_fix_horizon)
    # --- optimisation ---
    lr: float | None = None                   # None: from the depth dial (presets.py), else 2e-3
    adamw_lr: float | None = None
    weight_decay: float = 0.1
    muon_ns_dtype: str = "auto"               # Newton-Schulz: auto (bf16 where bf16 matmuls are native) | float32 | bfloat16
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
    autocast: str = "auto"                    # auto (use_bf16_autocast, use_bf16_head) | bf16 | head | off
    compile: bool | str = False               # True / "inductor", or another torch.compile backend name
    deterministic: bool = False
    find_unused_parameters: bool = False
    fsdp: bool = False                        # under torchrun: FSDP2 fully_shard instead of DDP
    # --- output ---
    export_model: bool = True                 # write RUN/model (needs a tokenizer) at the end
    # --- divergence ---
    on_nonfinite: str = "stop"                # stop | skip: a non-finite loss or gradient norm
    max_nonfinite_skips: int = 10             # skip: stop after this many such steps in a row

    def to_json(self) -> dict:
        return asdict(self)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming every out-of-range setting at once (config_checks.py), before
        anything is built."""
        check_ranges(self, "TrainConfig", _TRAIN_INTS, _TRAIN_FLOATS, _TRAIN_CHOICES)
        return self


_TRAIN_INTS = {
    "seq_len": INT(1), "micro_batch": INT(1), "batch_tokens": INT(1, optional=True), "max_steps": INT(0, optional=True),
    "calibrate_steps": INT(1), "warmup_steps": INT(0, optional=True), "indexer_warmup_steps": INT(0),
    "depth": INT(1, optional=True), "eval_every": INT(0), "eval_tokens": INT(0), "sample_every": INT(0),
    "sample_tokens": INT(0), "log_every": INT(1), "ckpt_every": INT(0), "keep_last": INT(0),
    "max_nonfinite_skips": INT(1), "seed": INT(0),
}
_TRAIN_FLOATS = {
    "minutes": FLOAT(0, optional=True), "lr": FLOAT(0, optional=True), "adamw_lr": FLOAT(0, optional=True),
    "weight_decay": FLOAT(0), "decay_frac": FLOAT(0, 1), "final_lr_frac": FLOAT(0, 1), "grad_clip": FLOAT(0),
    "mtp_weight": FLOAT(0), "mtp_weight_decay": FLOAT(0), "balance_alpha": FLOAT(0), "indexer_weight": FLOAT(0),
    "bias_update_speed": FLOAT(0), "fim_rate": FLOAT(0, 1), "peak_tflops": FLOAT(0, optional=True, open_lo=True),
}
_TRAIN_CHOICES = {
    "muon_ns_dtype": ("auto", "float32", "bfloat16"), "decay_shape": ("cosine", "linear"),
    "device": ("auto", "cpu", "cuda"), "autocast": AUTOCAST_SETTINGS, "on_nonfinite": ("stop", "skip"),
}


@dataclass
class TrainState:
    """The counters of a run (saved in every checkpoint as the tree's "trainer" entry)."""

    step: int = 0
    tokens: int = 0
    total_steps: int | None = None
    train_seconds: float = 0.0
    skipped_steps: int = 0           # updates dropped for a non-finite loss / gradient norm
    horizon_fixed: bool = False      # a time budget's horizon no longer moves (its LR decay has begun)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Run:
    """Everything `setup` builds; `train_step` and the loop work on it."""

    cfg: TrainConfig
    dist: Dist
    model: nn.Module                 # the bare Transformer (its parameters may be FSDP-sharded)
    objective: Objective
    state: TrainState
    accum: int                       # micro-steps per optimizer step on each rank
    n_data: int                      # data shards = world * accum
    batch_tokens: int
    tokenizer: object = None
    module: nn.Module | None = None  # model + objective, wrapped for DDP / FSDP
    eval_model: nn.Module | None = None
    opt: object = None
    loaders: list = field(default_factory=list)
    fsdp: bool = False
    use_bf16: bool = False
    log: MetricsLog | None = None
    flops_per_token: float = 0.0
    peak_flops: float = 1.0
    run_dir: Path = Path(".")
    last_eval: dict | None = None
    last_tokens: int = 0             # st.tokens at the previous step record
    nonfinite_streak: int = 0        # non-finite steps in a row (--on-nonfinite skip)

    def autocast(self):
        if self.use_bf16:
            return torch.autocast(self.dist.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Evaluation pieces

def evaluate_bpb(model: nn.Module, batches, token_bytes: torch.Tensor, d: Dist | None = None,
                 autocast=contextlib.nullcontext) -> dict:
    """Validation loss (nats/token over all supervised targets) and bits-per-byte, summed over
    ranks: the one evaluation loop of nanoseek.eval.bpb, named in the trainer's vocabulary."""
    d = d or Dist()
    r = eval_bpb(model, batches, token_bytes, device=d.device, autocast=autocast,
                 reduce=lambda sums: all_reduce(sums, d))
    return {"val_bpb": r["bpb"], "val_loss": r["loss"], "val_tokens": r["supervised_tokens"]}


@torch.no_grad()
def greedy_complete(model: nn.Module, tokenizer, prompt: str | list[int], max_new_tokens: int = 48) -> str:
    """Greedy continuation with the decode cache (a deliberately simple loop; nanoseek.engine
    has the full sampler). `prompt`: text (BOS is added) or token ids."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ids = list(prompt) if not isinstance(prompt, str) else [tokenizer.bos_id] + tokenizer.encode(prompt)
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    logits = model(torch.tensor([ids], device=dev), cache=cache, logits_to_keep=1)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt == tokenizer.eos_id:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]], device=dev), cache=cache)
    model.train(was_training)
    return tokenizer.decode(out)


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

    def forward(self, input_ids, **kw):   # (cache, doc_ids, logits_to_keep, ...: the model's keywords)
        return self.root(input_ids, _call="model", **kw)

    def new_cache(self, *args, **kw):
        return self._model[0].new_cache(*args, **kw)


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
# Set-up

def _data_vocab(cfg: TrainConfig, objective: Objective, tok) -> int:
    """The model's vocabulary: the shards' (pre-training), else the model directory's (a
    fine-tune: its embedding may be padded past the tokenizer), else the tokenizer's."""
    vocab = objective.vocab_size(cfg)
    if vocab is None and cfg.model and Path(cfg.model).is_dir():
        from nanoseek.config import ModelConfig

        vocab = ModelConfig.from_json(cfg.model).vocab_size
    if vocab is None and tok is not None:
        vocab = tok.vocab_size
    if vocab is None:
        raise ValueError("cannot tell the vocabulary size: give a tokenizer or a model directory")
    if tok is not None and tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model / data only {vocab}")
    return vocab


def _geometry(cfg: TrainConfig, d: Dist, objective: Objective) -> tuple[int, int]:
    """(accumulation micro-steps per rank, global tokens per optimizer step). An objective whose
    batches are not rows of seq_len tokens (RL, distillation: rollouts) sets its micro-steps."""
    own = objective.micro_steps(cfg, d.world)
    if own is not None:
        return own, 0
    rows_tokens = cfg.micro_batch * cfg.seq_len
    batch_tokens = cfg.batch_tokens or rows_tokens * d.world
    per_step = rows_tokens * d.world
    if batch_tokens % per_step:
        raise ValueError(f"batch_tokens {batch_tokens} is not a multiple of micro_batch*seq_len*world = {per_step}")
    return batch_tokens // per_step, batch_tokens


def _resume(run: Run) -> dict | None:
    """Load the newest checkpoint of the run directory into model, state, loaders and RNG;
    return its tree (the optimizer state is loaded after wrapping)."""
    cfg, d = run.cfg, run.dist
    if not cfg.resume:
        if latest_checkpoint(run.run_dir) is not None:
            raise FileExistsError(f"{run.run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                                  f"or choose another --out")
        return None
    resume_from, damaged = latest_intact_checkpoint(run.run_dir)
    for path, why in damaged:
        if d.is_main:
            print(f"skipping damaged checkpoint {path}: {why}", file=sys.stderr)
    if resume_from is None:
        if damaged:
            raise ValueError(f"{run.run_dir}: no intact checkpoint to resume from ({len(damaged)} damaged; newest: "
                             f"{damaged[0][1]})")
        return None
    tree = load_tree(resume_from / "train_state.safetensors")
    run.model.load_state_dict(load_model_state(resume_from), strict=True)
    run.state = TrainState.from_dict(tree["trainer"])
    if cfg.max_steps is not None:
        run.state.total_steps = cfg.max_steps
    if tree["data_ranks"] == run.n_data:
        for k, ld in enumerate(run.loaders):
            ld.load_state_dict(tree["loaders"][d.rank * run.accum + k])
    else:
        warnings.warn(f"checkpoint was written with {tree['data_ranks']} data ranks, now {run.n_data}: "
                      f"the data stream restarts (seeded by the step)", stacklevel=2)
        run.loaders = _make_loaders(run, cfg.seed + run.state.step)
    if "objective" in tree and hasattr(run.objective, "load_state_dict"):
        run.objective.load_state_dict(tree["objective"])
    torch.set_rng_state(tree["rng"]["cpu"])
    if d.device.type == "cuda" and "cuda" in tree["rng"]:
        torch.cuda.set_rng_state(tree["rng"]["cuda"])
    if d.is_main and cfg.progress:
        print(f"resumed from {resume_from} (step {run.state.step})", file=sys.stderr)
    tree["_path"] = str(resume_from)
    return tree


def _make_loaders(run: Run, seed: int) -> list:
    return [run.objective.make_loader(run, run.dist.rank * run.accum + k, run.n_data, seed)
            for k in range(run.accum)]


def _wrap(run: Run) -> None:
    """DDP / FSDP2, regional compile, then the optimizer (built after wrapping: FSDP2 replaces
    the parameters by sharded DTensors)."""
    cfg, d, model = run.cfg, run.dist, run.model
    run.fsdp = cfg.fsdp and d.enabled
    unused = cfg.find_unused_parameters or cfg.mtp_weight == 0 or cfg.indexer_weight == 0
    run.module = parallelize(model, _ObjectiveModule(model, run.objective), d, fsdp=run.fsdp,
                             find_unused_parameters=unused)
    if cfg.compile:
        # regional compilation (torchtitan-style, per block): one compiled function for all
        # blocks, so compile time scales with the number of block kinds, not with depth; the
        # MoE grouped expert pass stays eager (data-dependent shapes). See docs/model.md. Under
        # FSDP2 the compiled halves run inside each block's call, after its parameters are gathered.
        model.compile_blocks(backend="inductor" if cfg.compile is True else str(cfg.compile))
    run.opt = build_optimizer(model, OptimConfig(lr=cfg.lr, adamw_lr=cfg.adamw_lr, weight_decay=cfg.weight_decay,
                                                       ns_dtype=cfg.muon_ns_dtype))
    run.eval_model = _RootCall(run.module, model) if run.fsdp else model
    run.use_bf16 = use_bf16_autocast(cfg.autocast, d.device, model.config)
    if not run.use_bf16 and use_bf16_head(cfg.autocast, d.device, model.config):
        model.head_dtype = torch.bfloat16


# Width from which "auto" trains in bf16 on a CPU with native bf16 matmuls: the depth dial's
# whole range. Whole trainer steps (V4 objective, Muon), bf16 against the bf16 LM head alone, same
# process: width 128 1.05x, 192 (the speedrun) 1.10x, 256 1.20x; `small` (512) 1.5x in forward +
# backward against fp32 (docs/train.md). At 192 bf16 used to be within noise of fp32, until
# bf16 kernels for SwiGLU, the folded attention and the residual streams took its casts away.
# Narrower models (the tests' `tiny`, 64) are unmeasured and keep the bf16 head alone.
CPU_BF16_MIN_WIDTH = 128
def use_bf16_autocast(setting: str, device: torch.device, config) -> bool:
    """--autocast: "bf16" / "off" as said; "auto" is bf16 on CUDA, and on CPUs with native bf16
    matmuls (AMX, AVX512-BF16) for models at least CPU_BF16_MIN_WIDTH wide; fp32 elsewhere."""
    if setting != "auto":
        return setting == "bf16"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and config.hidden_size >= CPU_BF16_MIN_WIDTH and fast_bf16_matmul("cpu")


def use_bf16_head(setting: str, device: torch.device, config) -> bool:
    """Whether the LM head + CE of the loss run in bf16 while the rest stays fp32 ("head"): as
    --autocast head says, and under "auto" on a CPU with native bf16 matmuls for the models
    too narrow for whole-model autocast (below CPU_BF16_MIN_WIDTH). There the head is the step's
    biggest product (at width 192: [1024, 192] x [192, 4096], three times per pass, twice with
    MTP: ~20% of a micro-step in fp32) and needs no other cast; its log-softmax stays fp32. The
    speedrun's micro-step, when it still ran in fp32: 1.17x (docs/train.md, "Speed")."""
    if setting in ("head", "bf16"):
        return True
    if setting != "auto":
        return False
    return device.type == "cpu" and fast_bf16_matmul("cpu")


def precision_name(run_bf16: bool, head_dtype) -> str:
    """What the start record and the report call the run's precision."""
    return "bf16" if run_bf16 else "head-bf16" if head_dtype == torch.bfloat16 else "off"


def _load_tokenizer(cfg: TrainConfig):
    if not cfg.tokenizer_dir:
        return None
    from nanoseek.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.tokenizer_dir)


def setup(cfg: TrainConfig, objective: Objective | None = None) -> Run:
    """Build the run: model (fresh, --init-from, or resumed), batch sources, wrapping,
    optimizer, logging. Every rank calls it."""
    from nanoseek.model import Transformer

    cfg = resolve_defaults(cfg.validate())
    keep_freed_memory()  # no page faults for every re-allocated activation (nanoseek/_runtime.py)
    d = setup_distributed(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    objective = objective or PretrainObjective(cfg.balance_alpha, cfg.indexer_weight)
    tok = _load_tokenizer(cfg)
    mc = build_model_config(cfg, _data_vocab(cfg, objective, tok))
    accum, batch_tokens = _geometry(cfg, d, objective)

    torch.manual_seed(cfg.seed)
    model = Transformer(mc)
    if cfg.init_from:
        model.load_state_dict(load_model_state(cfg.init_from), strict=False)
    model.to(d.device).train()
    run = Run(cfg=cfg, dist=d, model=model, objective=objective, state=TrainState(total_steps=cfg.max_steps),
              accum=accum, n_data=d.world * accum, batch_tokens=batch_tokens, tokenizer=tok,
              run_dir=Path(cfg.run_dir))
    objective.prepare(run)
    if cfg.max_steps is None and cfg.minutes is None:
        # an objective may know its own horizon (SFT: --epochs over its data)
        run.state.total_steps = getattr(objective, "default_total_steps", lambda r: None)(run)
        if run.state.total_steps is None:
            raise ValueError("give max_steps or minutes")
    run.loaders = _make_loaders(run, cfg.seed)
    tree = _resume(run)
    _wrap(run)
    if tree is not None:
        load_optimizer_state(run.opt, tree["optimizer"], run.fsdp)
    run.last_tokens = run.state.tokens
    _start_log(run, resumed=tree is not None)
    return run


def _start_log(run: Run, resumed: bool) -> None:
    cfg, d, model = run.cfg, run.dist, run.model
    run.log = MetricsLog(run.run_dir, d.is_main, cfg.tensorboard, run.state.step if resumed else None)
    if d.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if not resumed:   # a fresh run: no samples or summary of an earlier attempt
            for stale in ("samples.jsonl", "summary.json"):
                (run.run_dir / stale).unlink(missing_ok=True)
        (run.run_dir / "train_config.json").write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    run.flops_per_token = training_flops_per_token(model, cfg.seq_len)
    run.peak_flops = cfg.peak_tflops * 1e12 if cfg.peak_tflops else \
        measure_peak_flops(d.device, torch.bfloat16 if run.use_bf16 else torch.float32)
    if d.is_main:
        run.log.write({"event": "start", "objective": run.objective.name, "step": run.state.step,
                       "params": sum(p.numel() for p in model.parameters()),
                       "activated_params": model.num_parameters(activated=True),
                       "flops_per_token": run.flops_per_token, "peak_flops": run.peak_flops,
                       "batch_tokens": run.batch_tokens, "accum": run.accum, "world": d.world,
                       "device": str(d.device), "autocast": precision_name(run.use_bf16, model.head_dtype)})


# ---------------------------------------------------------------------------------------------
# One step

def _phase(run: Run) -> dict:
    """Set the LR multiplier and the dense-CSA switch for this step; return the objective's phase."""
    cfg, st = run.cfg, run.state
    total = st.total_steps or 10**12
    run.model.dense_csa = st.step < cfg.indexer_warmup_steps
    # a short run (or a small time budget) never spends more than a fifth of it warming up
    warmup = min(cfg.warmup_steps, max(1, total // 5))
    run.opt.set_lr_mult(lr_schedule(st.step, total, warmup_steps=warmup, decay_frac=cfg.decay_frac,
                                    shape=cfg.decay_shape, final_frac=cfg.final_lr_frac))
    in_decay = st.total_steps is not None and st.step >= decay_start(total, cfg.decay_frac)
    return {"step": st.step, "mtp_weight": cfg.mtp_weight_decay if in_decay else cfg.mtp_weight}


def to_device(value, device: torch.device):
    """A batch on the training device, tensors nested in dicts / lists / tuples included (an
    objective's per-batch stats, which it returns among its terms: left on the CPU, a single-GPU
    run's term meter would stack CUDA and CPU scalars; DDP moves nested inputs itself)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        moved = [to_device(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # (namedtuples)
    return value


def train_step(run: Run, micro_batches: list[dict], phase: dict) -> dict:
    """One optimizer step over this rank's micro-batches: forward/backward with accumulation,
    the routed-load all-reduce, clipping, the optimizer and the router-bias update.
    Returns the objective's terms averaged over micro-steps and ranks, plus grad_norm and the
    expert-load statistics."""
    cfg, d, model = run.cfg, run.dist, run.model
    meter = TermMeter()
    units = [run.objective.loss_units(b) for b in micro_batches]
    if units and all(u is not None for u in units):   # the step's total, for objectives.step_share
        total = all_reduce(torch.tensor(float(sum(units)), dtype=torch.float64), d)
        phase = {**phase, "loss_units": float(total), "loss_shards": run.accum * d.world}
    for k, batch in enumerate(micro_batches):
        batch = to_device(batch, d.device)
        with no_sync(run.module, d, run.fsdp, last_micro_step=k == len(micro_batches) - 1):
            with run.autocast():
                terms = run.module(batch, phase)
            (terms["loss"] / run.accum).backward()
        meter.add(terms, divisor=run.accum)
    # aux-loss-free balancing: sum the routed load over ranks, then every rank applies the same
    # sign update to its copy of gate.bias
    moe = [m for m in model.moe_layers() if not m.is_hash]
    loads = None
    if moe:
        loads = torch.stack([m.load for m in moe])
        all_reduce(loads, d)
        for m, l in zip(moe, loads):
            m.load.copy_(l)
    gnorm = float(unshard(torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                         cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))))
    out = meter.reduce(d)                     # averaged over ranks: every rank sees the same numbers
    if not (math.isfinite(out["loss"]) and math.isfinite(gnorm)):
        _nonfinite(run, out["loss"], gnorm, moe)
        out.update(grad_norm=gnorm, skipped=1)
        return out
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    model.update_router_bias(cfg.bias_update_speed)
    out["grad_norm"] = gnorm
    out.update(expert_load_metrics(loads))
    return out


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm is not finite (a diverging run or damaged weights)."""


def _nonfinite(run: Run, loss: float, gnorm: float, moe: list) -> None:
    """--on-nonfinite: "stop" raises (the run ends with a non-zero exit, its checkpoints are
    the finite ones written before); "skip" drops this step's update (gradients, routed-load
    counts) and goes on, up to max_nonfinite_skips steps in a row."""
    run.opt.zero_grad(set_to_none=True)
    for m in moe:
        m.load.zero_()
    run.nonfinite_streak += 1
    run.state.skipped_steps += 1
    step = run.state.step + 1
    if run.dist.is_main:
        run.log.write({"event": "nonfinite", "step": step, "loss": loss, "grad_norm": gnorm,
                       "action": run.cfg.on_nonfinite})
    last = latest_checkpoint(run.run_dir)
    where = f"the last checkpoint, {last}, is intact" if last else "no checkpoint was written"
    if run.cfg.on_nonfinite == "stop":
        raise NonFiniteError(f"step {step}: non-finite loss ({loss}) or gradient norm ({gnorm}): the run diverged "
                             f"or its weights are damaged; {where} (lower --lr, or --on-nonfinite skip to skip such steps)")
    if run.nonfinite_streak > run.cfg.max_nonfinite_skips:
        raise NonFiniteError(f"step {step}: {run.nonfinite_streak} non-finite steps in a row (loss {loss}, gradient "
                             f"norm {gnorm}); stopping; {where}")
    warnings.warn(f"step {step}: non-finite loss ({loss}) or gradient norm ({gnorm}): update skipped", stacklevel=2)


# ---------------------------------------------------------------------------------------------
# The loop

HORIZON_WINDOW = 32  # a time budget's horizon follows the mean time of this many recent steps


def _fix_horizon(run: Run, dt: float, step_times: list[float], bar) -> None:
    """Time budget (--minutes without --max-steps): the horizon is first estimated after
    `calibrate_steps` timed steps, then re-estimated every step from the mean time of the last
    HORIZON_WINDOW steps until the LR decay begins, and fixed from then on. The warmup-stable-decay
    schedule does not depend on the horizon before its decay, so the estimate can follow the
    machine's speed: fixed after three steps, the speedrun's 10 minutes of pre-training ran for
    12.9 as its steps slowed from 0.72 to 0.93 s. Under torchrun every rank takes the largest."""
    st, cfg = run.state, run.cfg
    if cfg.max_steps is not None or cfg.minutes is None or st.horizon_fixed:
        return
    if st.step >= 2:   # (the first steps build kernels and fill caches)
        step_times.append(dt)
        del step_times[:-HORIZON_WINDOW]
    budget = cfg.minutes * 60
    if all_reduce_max(float(st.train_seconds >= budget), run.dist):
        st.total_steps, st.horizon_fixed = st.step, True   # budget spent before the decay began: stop here
    elif len(step_times) >= cfg.calibrate_steps:
        mean = sum(step_times) / len(step_times)
        st.total_steps = int(all_reduce_max(st.step + max(1, int((budget - st.train_seconds) / mean)), run.dist))
        st.horizon_fixed = st.step >= decay_start(st.total_steps, cfg.decay_frac)   # the next step decays
    if bar is not None and bar.total != st.total_steps:
        bar.total = st.total_steps
        bar.refresh()


def _step_record(run: Run, terms: dict, phase: dict, dt: float, t_data: float) -> dict:
    st = run.state
    step_tokens = st.tokens - run.last_tokens
    run.last_tokens = st.tokens
    rec = {"step": st.step, "tokens": st.tokens, "lr": run.opt.param_groups[0]["lr"],
           "grad_norm": terms.pop("grad_norm"), "dt": round(dt, 4), "data_s": round(t_data, 4),
           "tok_per_s": round(step_tokens / dt, 1),
           "mfu": run.flops_per_token * step_tokens / dt / run.peak_flops, "dense_csa": run.model.dense_csa,
           "mtp_weight": phase["mtp_weight"]}
    load = {k: terms.pop(k) for k in ("expert_imbalance", "expert_load") if k in terms}
    rec.update(terms)
    rec.update(run.objective.step_metrics())
    rec.update(load)
    return rec


def run_eval(run: Run, step: int) -> dict | None:
    """The objective's held-out evaluation: validation loss / bits-per-byte on its val batches,
    plus whatever its `evaluate` measures (RL: held-out pass@k)."""
    t0 = time.perf_counter()
    batches = run.objective.val_batches(run) if run.tokenizer is not None else None
    r: dict = {}
    if batches is not None:
        token_bytes = torch.as_tensor(run.tokenizer.token_byte_lengths(), device=run.dist.device)
        r.update(evaluate_bpb(run.eval_model, batches, token_bytes, run.dist, run.autocast))
    r.update(run.objective.evaluate(run) or {})
    if not r:
        return None
    r.update(step=step, event="eval", seconds=round(time.perf_counter() - t0, 2))
    if run.dist.is_main:
        run.log.write(r)
    return r


def run_samples(run: Run, step: int) -> list[str]:
    tok, d = run.tokenizer, run.dist
    if tok is None or not (d.is_main or run.fsdp):   # FSDP: every rank takes part in the forwards
        return []
    outs = []
    for p in run.cfg.sample_prompts:
        with run.autocast():
            text = greedy_complete(run.eval_model, tok, run.objective.sample_prompt_ids(tok, p)
                                   if hasattr(run.objective, "sample_prompt_ids") else p, run.cfg.sample_tokens)
        outs.append(text)
        if d.is_main:
            with open(run.run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "prompt": p, "completion": text}) + "\n")
    return outs


def save(run: Run, step: int, export: bool = False) -> None:
    """Checkpoint `step` (every rank calls it: gathering is collective); with export, also the
    self-contained model directory RUN/model."""
    d = run.dist
    states = [s for rank_states in gather_objects([ld.state_dict() for ld in run.loaders], d) for s in rank_states]
    to_save, optim_state = gathered_state(run.model, run.opt, run.fsdp)
    # every rank checks its (replicated or gathered) copy, so all ranks stop together
    bad = [k for k, v in to_save.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:   # never let a damaged model replace (and, with --keep-last, prune) a good checkpoint
        raise NonFiniteError(f"step {step}: {len(bad)} weight tensors are not finite (first: {bad[0]}); "
                             f"no checkpoint written")
    if d.is_main:
        rng = {"cpu": torch.get_rng_state()}
        if d.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        tree = {"trainer": run.state.state_dict(), "optimizer": optim_state, "loaders": states,
                "data_ranks": run.n_data, "rng": rng, "config": json.loads(json.dumps(run.cfg.to_json()))}
        if hasattr(run.objective, "state_dict"):
            tree["objective"] = run.objective.state_dict()
        files = None
        if run.tokenizer is not None:   # step checkpoints are model directories too (tokenizer, generation_config)
            from nanoseek.train.export import ModelDirFiles

            files = ModelDirFiles(run.tokenizer, config=run.model.config)
        save_checkpoint(run.run_dir, step, to_save, tree, keep_last=run.cfg.keep_last, tokenizer=files)
        if export and run.tokenizer is not None:
            from nanoseek.train.export import write_model_dir

            write_model_dir(to_save, run.tokenizer, run.run_dir / "model")
    barrier(d)


def _after_step(run: Run, rec: dict, bar) -> None:
    """Log, progress, and the periodic evaluation / samples / checkpoint."""
    cfg, st = run.cfg, run.state
    if run.dist.is_main and (st.step % cfg.log_every == 0 or st.step == st.total_steps):
        run.log.write(rec)
    if bar is not None:
        bar.update(1)
        shown = {k: f"{rec[k]:.3g}" for k in run.objective.progress_keys if k in rec}
        bar.set_postfix(loss=f"{rec['loss']:.3f}", **shown, lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tok_per_s']:.0f}",
                        refresh=False)
    done = st.total_steps is not None and st.step >= st.total_steps
    if done:
        return
    if cfg.eval_every and st.step % cfg.eval_every == 0:
        r = run_eval(run, st.step)
        if r:
            run.last_eval = r
            if bar is not None:
                bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items()
                                                          if isinstance(v, float) and k != "seconds"))
    if cfg.sample_every and st.step % cfg.sample_every == 0:
        for s in run_samples(run, st.step):
            if bar is not None:
                bar.write(f"step {st.step} sample: {s!r}")
    if cfg.ckpt_every and st.step % cfg.ckpt_every == 0:
        save(run, st.step)


def loop(run: Run) -> dict:
    """Steps until the horizon; returns the last step's record."""
    st, d = run.state, run.dist
    bar = None
    if d.is_main and run.cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=st.total_steps, initial=st.step, desc=run.objective.name, unit="step",
                   file=sys.stderr, dynamic_ncols=True)
    step_times: list[float] = []
    rec: dict = {}
    try:
        while st.total_steps is None or st.step < st.total_steps:
            t0 = time.perf_counter()
            phase = _phase(run)
            batches = [next(ld) for ld in run.loaders]   # RL / distillation: rollouts happen here
            t_data = time.perf_counter() - t0
            terms = train_step(run, batches, phase)
            if not terms.get("skipped"):
                run.nonfinite_streak = 0
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            st.step += 1
            st.tokens += run.objective.step_tokens(run, batches) or run.batch_tokens
            st.train_seconds += dt
            _fix_horizon(run, dt, step_times, bar)
            rec = _step_record(run, terms, phase, dt, t_data)
            _after_step(run, rec, bar)
    finally:
        if bar is not None:
            bar.close()
    return rec


def finish(run: Run, rec: dict, wall: float) -> dict:
    """Final evaluation, samples, checkpoint and model directory; summary.json."""
    st, d, cfg = run.state, run.dist, run.cfg
    last_eval = run_eval(run, st.step) or run.last_eval
    samples = run_samples(run, st.step)
    save(run, st.step, export=cfg.export_model)
    model_dir = run.run_dir / "model"
    summary = {"objective": run.objective.name, "steps": st.step, "tokens": st.tokens,
               "skipped_steps": st.skipped_steps,
               "train_seconds": round(st.train_seconds, 2), "wall_seconds": round(wall, 2),
               "params": sum(p.numel() for p in run.model.parameters()),
               "activated_params": run.model.num_parameters(activated=True),
               "final_loss": rec.get("loss"), "val": last_eval, "samples": dict(zip(cfg.sample_prompts, samples)),
               "tok_per_s": round(st.tokens / max(st.train_seconds, 1e-9), 1),
               "mfu": run.flops_per_token * st.tokens / max(st.train_seconds, 1e-9) / run.peak_flops,
               "world": d.world, "checkpoint": str(latest_checkpoint(run.run_dir)) if d.is_main else None,
               "model_dir": str(model_dir) if d.is_main and (model_dir / "config.json").is_file() else None}
    summary.update(run.objective.summary())
    if d.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.log.write({"event": "end", "step": st.step,
                       **{k: v for k, v in summary.items() if k in ("tokens", "train_seconds", "tok_per_s", "mfu")}})
    run.log.close()
    return summary


def train(cfg: TrainConfig, objective: Objective | None = None) -> dict:
    """Train per `cfg` with `objective` (default: pre-training on cfg.shard_dir); return a
    summary dict (also written to RUN/summary.json)."""
    run = setup(cfg, objective)
    t_run = time.perf_counter()
    rec = loop(run)
    return finish(run, rec, time.perf_counter() - t_run)
