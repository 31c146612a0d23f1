"""`nanoseek train`, `sft`, `rl`, `distill`, `report` and `speedrun`: thin wrappers over trainer.py,
sft.py, rl.py, distill.py, report.py and speedrun.py (see docs/train.md). Flags that mirror a config
dataclass (TrainConfig, SFTConfig, RLConfig, DistillConfig) are generated from it; the tables here
add only help text, choices, kept older spellings and what a None default means."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from nanoseek._argparse import (SCALAR_TYPES, add_config_flags, config_from_flags, field_default, float_list,
                                int_at_least, number_in, show_defaults, type_name)

from nanoseek.train.trainer import AUTOCAST_SETTINGS, TrainConfig


def _err(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def _guarded(fn, args) -> int:
    """Run a training command: user errors print one line and exit 2; a diverged run (non-finite
    loss or gradients) prints one line and exits 1."""
    from nanoseek.train.trainer import NonFiniteError

    try:
        return fn(args)
    except NonFiniteError as e:
        return _err(str(e), 1)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            kw[f.name] = v
    if getattr(args, "prompt", None):
        kw["sample_prompts"] = list(args.prompt)
    if getattr(args, "no_progress", False):
        kw["progress"] = False
    if kw.get("model"):
        kw.setdefault("depth", None)
    return TrainConfig(**kw)


def _train(cfg, objective=None) -> dict:
    """`train()` for a command, which owns its process: under torchrun the process group ends with
    the run (parallelize.shutdown_distributed), so no rank exits while a peer still talks to it."""
    from nanoseek.train.parallelize import shutdown_distributed
    from nanoseek.train.trainer import train

    summary = train(cfg, objective)
    shutdown_distributed()
    return summary


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if cfg.max_steps is None and cfg.minutes is None:
            return _err("give --max-steps / --steps or --minutes")
        summary = _train(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    if summary.get("checkpoint"):
        val = summary.get("val") or {}
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, "
              f"{summary['tok_per_s']:.0f} tok/s, val bpb {val.get('val_bpb', float('nan')):.4f}; "
              f"checkpoint {summary['checkpoint']}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from nanoseek.train.report import write_report

    try:
        path = write_report(args.run_dir)
    except (FileNotFoundError, ValueError) as e:
        return _err(str(e))
    print(path)
    return 0


def _cmd_speedrun(args: argparse.Namespace) -> int:
    from nanoseek.train.parallelize import shutdown_distributed
    from nanoseek.train.speedrun import speedrun

    try:
        speedrun(args.out, minutes=args.minutes, depth=args.depth, corpus_mb=args.corpus_mb,
                 vocab_size=args.vocab_size, force_train=args.retrain, sft=not args.no_sft, rl=not args.no_rl,
                 sft_minutes=args.sft_minutes, rl_minutes=args.rl_minutes, tasks=args.tasks,
                 eval_tasks=args.eval_tasks)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    shutdown_distributed()   # under torchrun: every rank done before any exits (as _train)
    return 0


# --- flags generated from TrainConfig -----------------------------------------------------------
# The loop's flags mirror TrainConfig fields one to one: the flag is `--field-name` (dest = the field),
# type and default come from the dataclass, and this table adds what the dataclass cannot say: help text,
# choices, extra spellings, and what a None default means. Order = the order in `--help`.
_LOOP_FLAGS: dict[str, dict] = {
    "tokenizer_dir": dict(flags=("--tokenizer",), help="tokenizer directory (for val bits-per-byte and samples)",
                          none="none: no bits-per-byte or samples"),
    "seq_len": dict(flags=("--seq-len", "--max-seq-len"), help="tokens per row", rows=True),
    "micro_batch": dict(help="rows per micro-step per rank", rows=True),
    "batch_tokens": dict(help="global tokens per optimizer step (accumulates)", none="one micro-step", rows=True),
    "max_steps": dict(flags=("--max-steps", "--steps"), help="optimizer steps", none="none: give it or --minutes"),
    "minutes": dict(help="training-time budget (the horizon follows the measured step time until the LR "
                         "decay begins)", none="none"),
    "calibrate_steps": dict(help="with --minutes: steps timed before the horizon's first estimate (re-estimated "
                                 "from the last 32 steps' mean time until the LR decay begins, fixed then)"),
    "lr": dict(help="peak LR", none="from the model's width"),
    "adamw_lr": dict(help="LR of the AdamW parameters (embeddings, norms, biases)", none="from the model's width"),
    "weight_decay": dict(help="decoupled weight decay"),
    "muon_ns_dtype": dict(choices=["auto", "float32", "bfloat16"],
                          help="Muon's Newton-Schulz dtype (auto: bf16 where bf16 matmuls are native)"),
    "warmup_steps": dict(help="linear LR warm-up", none="from the model's size"),
    "decay_frac": dict(help="share of the run over which the LR decays"),
    "decay_shape": dict(choices=["cosine", "linear"], help="LR decay shape (linear: WSD)"),
    "final_lr_frac": dict(help="LR at the end of the decay, as a share of the peak"),
    "grad_clip": dict(help="gradient-norm clip"),
    "mtp_weight": dict(help="weight of the multi-token-prediction loss"),
    "mtp_weight_decay": dict(help="MTP weight once the LR decay starts"),
    "balance_alpha": dict(help="sequence-wise expert-balance loss weight"),
    "indexer_weight": dict(help="CSA indexer KL loss weight"),
    "bias_update_speed": dict(help="auxiliary-loss-free expert bias update speed"),
    "seed": dict(help="seed of the initialisation and the data order"),
    "eval_every": dict(help="steps between validation passes"),
    "eval_tokens": dict(help="validation tokens per pass"),
    "sample_every": dict(help="steps between samples (0: only at the end)"),
    "sample_prompts": dict(flags=("--prompt",), dest="prompt", action="append",
                           help="sample prompt (repeatable)"),
    "sample_tokens": dict(help="tokens generated per sample"),
    "log_every": dict(help="steps between metric lines"),
    "ckpt_every": dict(help="steps between checkpoints (0: only at the end)"),
    "keep_last": dict(help="checkpoints kept"),
    "resume": dict(help="continue from the newest checkpoint in --out"),
    "device": dict(choices=["auto", "cpu", "cuda"], help="auto: CUDA when available"),
    "autocast": dict(choices=list(AUTOCAST_SETTINGS), help="auto: bf16 on CUDA, and on CPUs with native bf16 matmuls (AMX, AVX512-BF16) for models of width >= 128, only the LM head + CE in bf16 (head) for narrower ones; fp32 elsewhere"),
    "compile": dict(nargs="?", const="inductor", metavar="BACKEND",
                    help="regional torch.compile of the blocks with BACKEND (inductor when none is named; "
                         "minutes of compilation at the start; docs/train.md)"),
    "deterministic": dict(help="deterministic kernels (slower)"),
    "fsdp": dict(help="under torchrun: shard with FSDP2 fully_shard instead of DDP"),
    "peak_tflops": dict(help="MFU denominator", none="measured"),
    "on_nonfinite": dict(choices=["stop", "skip"],
                         help="a non-finite loss or gradient norm: stop with an error or skip that update"),
    "max_nonfinite_skips": dict(help="with --on-nonfinite skip: stop after this many such steps in a row"),
    "progress": dict(flags=("--no-progress", "--quiet"), dest="no_progress", action="store_true", default=False,
                     help="no progress bar"),
}

# `train`'s own TrainConfig flags (sft/rl/distill take the model as a directory instead).
_TRAIN_FLAGS: dict[str, dict] = {
    "run_dir": dict(flags=("--out",), required=True, help="run directory (metrics, checkpoints, report)"),
    "shard_dir": dict(flags=("--shards",), required=True, help="token shards (nanoseek data tokenize)"),
    "model": dict(help="preset name (tiny, small, ...) or a config/checkpoint directory", none="from --depth"),
    "depth": dict(help="scale dial: width, heads, experts, LR, batch follow from it"),
    "init_from": dict(help="start from the weights of this checkpoint directory", none="random init"),
    "indexer_warmup_steps": dict(help="dense CSA for the first N steps"),
    "fim_rate": dict(help="share of documents rearranged fill-in-the-middle"),
}

# TrainConfig fields with no flag: set by the recipes, or switches nobody has asked for on the command line.
NOT_FLAGS = frozenset({"tensorboard", "find_unused_parameters", "export_model"})

# Loop fields that sft / rl / distill set from the model directory (their `*_train_config`), so
# their `--help` does not show TrainConfig's pre-training default for them.
_RECIPE_SETS = {
    "tokenizer_dir", "seq_len", "micro_batch", "lr", "warmup_steps", "decay_frac", "decay_shape", "eval_every",
    "eval_tokens", "sample_prompts", "sample_tokens", "mtp_weight", "mtp_weight_decay", "ckpt_every", "keep_last",
}

def _shown_default(f: dataclasses.Field, spec: dict, recipe: str | None) -> str:
    if recipe and f.name in _RECIPE_SETS:
        return f"from the {recipe} recipe and the model"
    d = field_default(f)
    if d is None:
        return spec.get("none", "from the model's size")
    if d is False:
        return "off"
    if d is True:
        return "on"
    if isinstance(d, list):
        return ", ".join(repr(x) for x in d) or "none"
    return str(d)


def _add_fields(p: argparse.ArgumentParser, table: dict[str, dict], rows: bool = True,
                recipe: str | None = None) -> None:
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, spec in table.items():
        if spec.get("rows") and not rows:
            continue
        f = fields[name]
        kw = {k: v for k, v in spec.items() if k not in ("flags", "none", "rows", "help")}
        kw.setdefault("dest", name)
        kw.setdefault("default", None)             # None: the field keeps its (recipe's) default
        if "action" not in kw and "nargs" not in kw:
            base = type_name(f.type)
            if base == "bool":
                kw["action"] = "store_true"
            else:
                kw["type"] = SCALAR_TYPES[base]
        flags = spec.get("flags") or ("--" + name.replace("_", "-"),)
        text = spec.get("help", "")
        if not kw.get("required") and name != "sample_prompts" and name != "progress":
            text = f"{text} (default: {_shown_default(f, spec, recipe)})".strip()
        elif name == "sample_prompts":
            text = f"{text} (default: {_shown_default(f, spec, recipe)})"
        kw["help"] = text.replace("%", "%%")
        p.add_argument(*flags, **kw)


def add_loop_arguments(p: argparse.ArgumentParser, rows: bool = True, recipe: str | None = None) -> None:
    """Flags of the one training loop, shared by `train`, `sft`, `rl` and `distill` (rows=False:
    no row geometry, for objectives whose batches are rollouts; recipe: the command whose
    `*_train_config` sets some defaults from the model). Generated from TrainConfig (_LOOP_FLAGS)."""
    _add_fields(p.add_argument_group("training loop (TrainConfig)"), _LOOP_FLAGS, rows=rows, recipe=recipe)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    _add_fields(p, _TRAIN_FLAGS)
    add_loop_arguments(p)


# SFTConfig fields as `sft` flags (dest = the field; default and type from the dataclass).
_SFT_FLAGS: dict[str, dict] = {
    "data": dict(action="append", required=True, metavar="FILE[:WEIGHT]",
                 help='JSONL of {"messages": [...], "tools": [...]?} (repeatable; WEIGHT repeats each example that '
                      "many times per epoch, fractions sampled)"),
    "thinking_ratio": dict(help="share of examples with reasoning_content rendered in thinking mode (0: chat mode)"),
    "val_fraction": dict(help="held-out share of the conversations for the validation loss (at most --max-val)"),
    "max_val": dict(help="held-out examples at most"),
    "min_val_pool": dict(help="fewer examples than this: no held-out split, all of them train"),
    "epochs": dict(help="passes over the (weighted) data, when neither --max-steps nor --minutes is given",
                   none="1 without --max-steps / --minutes"),
}


def add_sft_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek.train.sft import SFTConfig

    _add_recipe_arguments(p, "MODEL", ("--model",), "model directory to fine-tune (config.json, safetensors, "
                          "tokenizer files)", "the fine-tuned model", "SFT data (SFTConfig)", SFTConfig, _SFT_FLAGS,
                          "sft", rows=True)


def _add_recipe_arguments(p: argparse.ArgumentParser, metavar: str, aliases: tuple[str, ...], model_help: str,
                          what: str, group: str, config_cls, flags: dict, recipe: str, rows: bool) -> None:
    """sft / rl / distill: the model (positional, or as an option), --out, the recipe's config
    dataclass as flags, then the shared loop flags."""
    p.add_argument("model_pos", nargs="?", metavar=metavar, help=model_help)
    p.add_argument(*aliases, dest="model_opt", help=f"same as the positional {metavar}")
    p.add_argument("--out", dest="run_dir", required=True, help=f"run directory; {what} goes to OUT/model")
    add_config_flags(p.add_argument_group(group), config_cls, flags)
    add_loop_arguments(p, rows=rows, recipe=recipe)


def _model_arg(args) -> str:
    model = getattr(args, "model_pos", None) or getattr(args, "model_opt", None)
    if not model:
        raise ValueError("give the model directory (positional MODEL or --model)")
    if not (Path(model) / "config.json").is_file():
        raise FileNotFoundError(f"{model}: not a model directory (no config.json)")
    return model


def _loop_overrides(args) -> dict:
    """TrainConfig fields given on the command line (the loop's flags)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
          if getattr(args, f.name, None) is not None and f.name not in ("model", "run_dir")}
    if getattr(args, "prompt", None):
        kw["sample_prompts"] = list(args.prompt)
    if getattr(args, "no_progress", False):
        kw["progress"] = False
    return kw


def _print_done(summary: dict, metric: str) -> None:
    if not summary.get("checkpoint"):
        return
    val = summary.get("val") or {}
    shown = f", {metric} {val[metric]:.4f}" if isinstance(val.get(metric), float) else ""
    print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tok_per_s']:.0f} tok/s{shown}")
    if summary.get("model_dir"):
        print(f"model: {summary['model_dir']}\nchat with it: nanoseek chat --model {summary['model_dir']}")


# RLConfig fields as `rl` flags (dest = the field; default and type from the dataclass).
_RL_FLAGS: dict[str, dict] = {
    "tasks": dict(required=True, help="JSONL of tasks: HumanEval-shaped for the code reward; a \"prompt\" field "
                                      "for plug-in rewards"),
    "held_out": dict(help="held-out tasks for pass@k", none="TASKS.heldout.jsonl if present"),
    "reward": dict(help="'code' (sandboxed unit tests) or module:function / path/to/file.py:function returning "
                        "a float"),
    "protocol": dict(choices=["chat", "completion"],
                     help="chat: the task is a user message; completion: the model continues the prompt"),
    "group_size": dict(help="samples per prompt"),
    "prompts_per_step": dict(help="prompts per optimizer step, over all ranks"),
    "micro_steps": dict(help="accumulation micro-steps per rank"),
    "max_new_tokens": dict(help="completion length limit"),
    "temperature": dict(help="rollout temperature (1: sampler = policy)"),
    "top_p": dict(),
    "top_k": dict(help="0: off"),
    "scale_by_std": dict(help="divide advantages by the group's std (GRPO; off: Dr. GRPO)"),
    "aggregation": dict(choices=["token", "sequence"],
                        help="token: DAPO's token-level mean; sequence: per-sequence mean, then over sequences"),
    "clip_low": dict(help="PPO ratio clip below 1"),
    "clip_high": dict(help="PPO ratio clip above 1 (DAPO's clip-higher)"),
    "updates_per_batch": dict(help="optimizer steps per rollout batch (>1: PPO ratio clipping matters)"),
    "kl_coef": dict(help="k3 KL to the frozen initial policy (0: off)"),
    "tis_cap": dict(help="cap of the truncated importance-sampling weight (sampler vs trainer log-probs)"),
    "overlong": dict(choices=["mask", "penalty", "none"],
                     help="completions cut by --max-new-tokens: masked out of the loss (DAPO's overlong "
                          "filtering), DAPO's soft length penalty, or nothing"),
    "overlong_buffer": dict(help="penalty ramp length in tokens", none="max-new-tokens/4"),
    "resample_zero_variance": dict(help="re-sample groups whose rewards are all equal, up to N times "
                                        "(0: drop and count them)"),
    "partial_credit": dict(help="code reward: share of asserts passed instead of all-pass"),
    "syntax_weight": dict(help="shaping: weight of the syntax-valid term"),
    "format_weight": dict(help="shaping (chat): weight of the ```python block term"),
    "length_weight": dict(help="shaping: penalty per token beyond the length target"),
    "eval_tasks": dict(help="held-out tasks per evaluation"),
    "eval_samples": dict(help="samples per held-out task (pass@1 and pass@k)"),
    "reward_workers": dict(help="sandbox threads scoring the code reward", none="cores + 1"),
}
# RLConfig fields with no `rl` flag: mtp_weight is the loop's --mtp-weight (rl_train_config's default).
RL_NOT_FLAGS = frozenset({"mtp_weight"})


def add_rl_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek.train.rl import RLConfig

    _add_recipe_arguments(p, "MODEL", ("--model",), "model directory (config.json, safetensors, tokenizer files)",
                          "the trained model", "GRPO (RLConfig)", RLConfig, _RL_FLAGS, "rl", rows=False)


def _cmd_rl(args: argparse.Namespace) -> int:
    from nanoseek.train.rl import RLConfig, RLObjective, rl_train_config

    try:
        model = _model_arg(args)
        rl = config_from_flags(RLConfig, args, _RL_FLAGS)
        cfg = rl_train_config(model, args.run_dir, rl, **_loop_overrides(args))
        if cfg.max_steps is None and cfg.minutes is None:
            return _err("give --max-steps or --minutes")
        objective = RLObjective(rl, cfg.balance_alpha, cfg.indexer_weight)
        try:
            summary = _train(cfg, objective)
        finally:
            objective.close()
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    _print_done(summary, "heldout_pass@1")
    return 0


# DistillConfig fields as `distill` flags (dest = the field; default and type from the dataclass).
_DISTILL_FLAGS: dict[str, dict] = {
    "teachers": dict(flags=("--teacher",), action="append", required=True, metavar="MODEL",
                     help="teacher model directory (repeatable); must share the student's tokenizer"),
    "weights": dict(type=float_list, metavar="W1,W2,...", none="equal",
                    help="teacher weights, comma-separated, summing to 1"),
    "prompts": dict(required=True, help='JSONL of {"prompt": text} or {"messages": [...]}'),
    "held_out": dict(help="held-out prompts for the KL evaluation", none="PROMPTS.heldout.jsonl if present"),
    "samples_per_prompt": dict(help="student completions per prompt"),
    "prompts_per_step": dict(help="over all ranks"),
    "micro_steps": dict(help="accumulation micro-steps per rank"),
    "max_new_tokens": dict(help="completion length limit"),
    "temperature": dict(help="student sampling temperature"),
    "estimator": dict(choices=["full", "sampled"],
                      help="full: reverse KL over the whole vocabulary; sampled: the sampled token's log-ratio only"),
    "kl_form": dict(choices=["mixture", "sum"],
                    help="several teachers: KL to their log-geometric mixture (same gradient) or the weighted sum"),
    "teacher_dtype": dict(choices=["bf16", "fp32"], help="teachers' weights dtype", none="as saved"),
    "eval_prompts": dict(help="held-out prompts per evaluation"),
}


def add_distill_arguments(p: argparse.ArgumentParser) -> None:
    from nanoseek.train.distill import DistillConfig

    _add_recipe_arguments(p, "STUDENT", ("--student", "--model"),
                          "student model directory (config.json, safetensors, tokenizer)", "the student",
                          "distillation (DistillConfig)", DistillConfig, _DISTILL_FLAGS, "distill", rows=False)


def _cmd_distill(args: argparse.Namespace) -> int:
    from nanoseek.train.distill import DistillConfig, DistillObjective, distill_train_config

    try:
        model = _model_arg(args)
        dc = config_from_flags(DistillConfig, args, _DISTILL_FLAGS)
        cfg = distill_train_config(model, args.run_dir, **_loop_overrides(args))
        if cfg.max_steps is None and cfg.minutes is None:
            return _err("give --max-steps or --minutes")
        summary = _train(cfg, DistillObjective(dc, cfg.balance_alpha, cfg.indexer_weight))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    _print_done(summary, "heldout_kl")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from nanoseek.train.sft import SFTConfig, SFTObjective, sft_train_config

    try:
        model = _model_arg(args)
        cfg = sft_train_config(model, args.run_dir, **_loop_overrides(args))
        sft = config_from_flags(SFTConfig, args, _SFT_FLAGS)
        if sft.epochs is None and cfg.max_steps is None and cfg.minutes is None:
            sft.epochs = 1.0       # no horizon given: one pass over the data
        summary = _train(cfg, SFTObjective(sft, cfg.balance_alpha, cfg.indexer_weight))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    _print_done(summary, "val_loss")
    return 0


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("train", help="pre-train a DeepSeek-V4 model on token shards",
                              description="Pre-train with the V4 recipe (Muon, MTP, bias balancing, indexer "
                                          "warm-up). Runs under torchrun for DDP.")
    add_train_arguments(p)
    p.set_defaults(func=lambda a, f=_cmd_train: _guarded(f, a))

    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat conversations (DeepSeek-V4 chat format)",
                              description="Fine-tune a model directory on JSONL conversations rendered with the "
                                          "DeepSeek-V4 chat encoding; the loss is on the assistant turns only. "
                                          "Runs under torchrun for DDP. The result is OUT/model (docs/train.md).")
    add_sft_arguments(p)
    p.set_defaults(func=lambda a, f=_cmd_sft: _guarded(f, a))

    p = subparsers.add_parser("rl", help="GRPO on sandboxed unit tests (or a plug-in reward), rollouts from the engine",
                              description="Reinforcement learning with the GRPO family on the one trainer loop: "
                                          "rollouts from nanoseek's engine, rewards from the eval sandbox or a "
                                          "plug-in function. Runs under torchrun for DDP. The result is OUT/model "
                                          "(docs/train.md).")
    add_rl_arguments(p)
    p.set_defaults(func=lambda a, f=_cmd_rl: _guarded(f, a))

    p = subparsers.add_parser("distill", help="multi-teacher on-policy distillation (full-vocabulary reverse KL)",
                              description="The student samples, every teacher scores the same tokens, the student "
                                          "minimises sum_i w_i KL(student || teacher_i) over the full vocabulary "
                                          "(DeepSeek-V4's merge step). The result is OUT/model (docs/train.md).")
    add_distill_arguments(p)
    p.set_defaults(func=lambda a, f=_cmd_distill: _guarded(f, a))

    p = subparsers.add_parser("report", help="write report.md and plots for a training run")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = subparsers.add_parser("speedrun", help="corpus -> tokenizer -> pre-training -> mined tasks -> SFT -> GRPO -> "
                                               "report, in one go (under torchrun: data-parallel training)")
    p.add_argument("--out", default="runs/speedrun", help="directory for every stage (default runs/speedrun)")
    p.add_argument("--minutes", type=number_in(0, open_lo=True), default=10.0, help="training-time budget (default 10)")
    p.add_argument("--depth", type=int_at_least(1), default=None, help="model dial (default: 3 on CPU, 8 on GPU)")
    p.add_argument("--max-mb", "--corpus-mb", dest="corpus_mb", metavar="MB", type=number_in(0, open_lo=True), default=None,
                   help="source MB to read for the corpus (default: 16 on CPU, 400 on GPU)")
    p.add_argument("--vocab-size", dest="vocab_size", type=int_at_least(1), default=None,
                   help="tokenizer vocabulary (default: 4096 on CPU, 16384 on GPU)")
    p.add_argument("--retrain", action="store_true", help="pre-train again even if a finished run exists")
    p.add_argument("--no-sft", action="store_true", help="stop after pre-training (no tasks, SFT or GRPO)")
    p.add_argument("--no-rl", action="store_true", help="stop after SFT (no GRPO)")
    p.add_argument("--sft-minutes", type=number_in(0), default=None, help="SFT budget (default 2.5 on CPU, 10 on GPU)")
    p.add_argument("--rl-minutes", type=number_in(0), default=None, help="GRPO budget (default 2.5 on CPU, 10 on GPU)")
    p.add_argument("--max-tasks", "--tasks", dest="tasks", metavar="N", type=int_at_least(1), default=None, help="verified tasks to mine (default 400 on CPU, 2000 on GPU)")
    p.add_argument("--eval-tasks", type=int_at_least(0), default=32, help="held-out tasks for the before/after table (default 32)")
    p.set_defaults(func=lambda a, f=_cmd_speedrun: _guarded(f, a))
    show_defaults(subparsers.choices["speedrun"])     # its flags mirror no dataclass


