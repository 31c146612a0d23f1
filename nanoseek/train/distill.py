"""Multi-teacher on-policy distillation (DeepSeek-V4 post-training, spec "Post-training" 2):
the student samples, every teacher scores the same tokens, and the student minimises
sum_i w_i KL(pi_student || pi_teacher_i) over the full vocabulary at every completion position.

    nanoseek distill --student runs/sft/model --teacher runs/code/model --teacher runs/math/model \\
        --weights 0.7,0.3 --prompts prompts.jsonl --out runs/distill

One optimizer step (per data shard): the student samples a completion per prompt through the
engine (rollouts.py, the model object being trained, temperature 1); each teacher -- anything
`Transformer.from_pretrained` loads, so an official V4 checkpoint can teach a small V4 student
on a GPU machine -- runs once over prompt + completion without gradients (optionally in bf16);
the loss is objectives.reverse_kl at the completion positions.

Several teachers: with q = the normalised log-geometric mixture (sum_i w_i log pi_i minus its
logsumexp), KL(p || q) and sum_i w_i KL(p || pi_i) differ by a term constant in the student, so
they have the same gradient (tested in tests/train/test_rl_losses.py). The mixture needs only
sum_i w_i z_i over the teachers' raw logits z_i (their normalisers cancel) and one
log-softmax, and only one [tokens, V] tensor is kept per batch whatever the number of teachers:
it is the default (`--kl-form mixture`; `sum` computes each teacher's KL). Memory stays
O(completion tokens x V) for the teachers and O(chunk x V) extra inside reverse_kl.
`--estimator sampled` is the cheaper Tinker-style estimator: only the sampled token's
log-ratio, as a per-token advantage (objectives.sampled_reverse_kl_loss); it needs only the
teachers' log-probs of the sampled tokens.

Logged: the loss (KL to the mixture), the KL to each teacher (the sampled-token estimate
log p_s(y) - log pi_i(y), unbiased), student entropy, response length, generation and teacher
seconds; every `--eval-every` steps the exact full-vocabulary KL to each teacher and to the
mixture on held-out prompts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.chat_format import encode_ids
from nanoseek.eval.common import read_jsonl
from nanoseek.train.config_checks import FLOAT, INT, check_ranges
from nanoseek.train.objectives import reverse_kl, sampled_reverse_kl_loss, step_share, teacher_weights
from nanoseek.train.parallelize import gather_objects
from nanoseek.train.rollouts import (RolloutLoader, RolloutObjective, RolloutStats, rollout_tensors, sample_rollouts,
                                     step_prompts)

# Distillation LR as a share of the pre-training LR of the student's width (presets.pretrain_lr):
# the targets are dense (a full distribution per token), so the signal is far less noisy than
# RL's and a larger step than RL's is safe.
DISTILL_LR_FRACTION = 0.3


@dataclass
class DistillConfig:
    prompts: str = ""
    held_out: str | None = None              # default: PROMPTS.heldout.jsonl if it exists
    teachers: list[str] = field(default_factory=list)
    weights: list[float] | None = None       # one per teacher, summing to 1 (default equal)
    samples_per_prompt: int = 1
    prompts_per_step: int = 8                # global, split over ranks x micro-steps
    micro_steps: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    estimator: str = "full"                  # full | sampled
    kl_form: str = "mixture"                 # mixture | sum (full estimator)
    teacher_dtype: str | None = None         # None: as saved; "bf16" / "fp32"
    eval_prompts: int = 16

    def check(self) -> None:
        if not self.teachers:
            raise ValueError("give at least one --teacher")
        check_ranges(self, "DistillConfig",
                     {"samples_per_prompt": INT(1), "prompts_per_step": INT(1), "micro_steps": INT(1),
                      "max_new_tokens": INT(1), "eval_prompts": INT(0)},
                     {"temperature": FLOAT(0, open_lo=True)},
                     {"estimator": ("full", "sampled"), "kl_form": ("mixture", "sum"),
                      "teacher_dtype": (None, "bf16", "bfloat16", "fp32", "float32")})
        self.weights = teacher_weights(self.weights, len(self.teachers))


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts from JSONL: {"prompt": raw text} or {"messages": [...]} (the chat encoding's
    generation prompt is appended)."""
    out = []
    for obj in read_jsonl(path):
        n = obj.pop("_line")
        if not (isinstance(obj.get("prompt"), str) or isinstance(obj.get("messages"), list)):
            raise ValueError(f'{path}:{n}: a prompt needs a "prompt" string or a "messages" list')
        out.append(obj)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_ids(item: dict, tokenizer) -> list[int]:
    if isinstance(item.get("messages"), list):
        return encode_ids(item["messages"], tokenizer, thinking_mode=item.get("thinking_mode", "chat"),
                          tools=item.get("tools"))[0]
    return tokenizer.encode(item["prompt"], add_bos=True)


def load_teacher(path: str, student_tokenizer, dtype: str | None, device) -> torch.nn.Module:
    """A frozen teacher, after checking that it reads the student's tokens."""
    from nanoseek.data.tokenizer import load_tokenizer
    from nanoseek.model import Transformer

    d = Path(path)
    if not (d / "tokenizer.json").is_file():
        raise FileNotFoundError(f"teacher {path} has no tokenizer.json: cannot check that it shares the "
                                f"student's tokenizer")
    theirs = load_tokenizer(d)
    if theirs.hf.get_vocab(with_added_tokens=True) != student_tokenizer.hf.get_vocab(with_added_tokens=True):
        raise ValueError(f"teacher {path} has another tokenizer than the student ({theirs.vocab_size} vs "
                         f"{student_tokenizer.vocab_size} tokens, or different ids): on-policy distillation "
                         f"compares distributions token by token, so they must share one")
    torch_dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                   "float32": torch.float32, None: None}[dtype]
    model = Transformer.from_pretrained(d, dtype=torch_dtype).to(device).eval().requires_grad_(False)
    if model.config.vocab_size < student_tokenizer.vocab_size:
        raise ValueError(f"teacher {path} has {model.config.vocab_size} logits, fewer than the tokenizer's "
                         f"{student_tokenizer.vocab_size} tokens")
    return model


@torch.no_grad()
def teacher_scores(teachers: list, weights: list[float], batch: dict, vocab: int, want_logits: bool, device):
    """(mixture logits at completion positions [N, V] or None, each teacher's log-prob of the
    sampled token [n_teachers, N]) for a rollout batch; N = completion tokens of the batch."""
    ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    pos = labels != -100
    tokens = labels[pos]
    mix = None
    tok_lp = []
    for w, t in zip(weights, teachers):
        z = t(ids)[..., :vocab][pos].float()            # [N, V]: only the completion positions are kept
        tok_lp.append(torch.log_softmax(z, -1).gather(-1, tokens[:, None])[:, 0])
        if want_logits:
            mix = w * z if mix is None else mix + w * z     # normalisers cancel in the mixture
    return mix, torch.stack(tok_lp)


class DistillObjective(RolloutObjective):
    """Full-vocabulary reverse KL to the teachers on the student's own samples (module docstring)."""

    name = "distill"
    progress_keys = ("kl_teacher0",)

    def __init__(self, cfg: DistillConfig, balance_alpha: float = 1e-4, indexer_weight: float = 1.0):
        cfg.check()
        self.cfg = cfg
        self.balance_alpha, self.indexer_weight = balance_alpha, indexer_weight
        self.teachers: list = []
        self.prompts: list[dict] = []
        self.held_out: list[dict] = []

    def prepare(self, run) -> None:
        if run.tokenizer is None:
            raise ValueError("distillation needs the student's tokenizer (tokenizer files in its directory)")
        c = self.cfg
        self.prompts = read_prompts(c.prompts)
        held = c.held_out
        if held is None:
            cand = Path(c.prompts).with_name(Path(c.prompts).stem + ".heldout" + Path(c.prompts).suffix)
            held = str(cand) if cand.is_file() else None
        self.held_out = read_prompts(held)[: c.eval_prompts] if held else []
        self.teachers = [load_teacher(t, run.tokenizer, c.teacher_dtype, run.dist.device) for t in c.teachers]
        self.vocab = run.tokenizer.vocab_size
        self.prepare_sampling(run)

    def make_loader(self, run, index: int, n_data: int, seed: int) -> "DistillLoader":
        return DistillLoader(self, run, index, n_data, seed)

    def loss_units(self, batch: dict) -> float:
        """The KL term's units: the student's sampled tokens (targets) in this batch."""
        return float((batch["labels"] != -100).sum())

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        t = model.loss(batch["input_ids"], batch["labels"], mtp_weight=0.0, balance_alpha=self.balance_alpha,
                       indexer_weight=self.indexer_weight, return_logits=True, token_mask=batch.get("token_mask"))
        pos = batch["labels"] != -100
        # the tokenizer's ids only: a padded embedding table's extra rows mean nothing to a teacher
        student = t.logits[pos][None][..., : self.vocab]    # [1, N, V]
        if self.cfg.estimator == "full":
            kl = reverse_kl(student, batch["teacher_mix"][None], form="mixture")
        else:
            tokens = batch["labels"][pos][None]
            w = torch.tensor(self.cfg.weights, device=student.device)[:, None]
            kl, kl_tokens = sampled_reverse_kl_loss(student, (w * batch["teacher_tok_lp"]).sum(0)[None], tokens)
            kl_logged = kl_tokens.mean()      # the unbiased KL estimate (kl itself is a surrogate loss)
        share = step_share(phase, self.loss_units(batch))   # the step's token mean
        loss = kl * share + self.balance_alpha * t.balance + self.indexer_weight * t.indexer
        out = {"loss": loss, "kl": (kl if self.cfg.estimator == "full" else kl_logged).detach() * share,
               "balance": t.balance.detach(), "indexer": t.indexer.detach()}
        with torch.no_grad():
            lp = torch.log_softmax(student[0].float(), -1)
            out["entropy"] = -(lp.exp() * lp).sum(-1).mean()
            s_tok = lp.gather(-1, batch["labels"][pos][:, None])[:, 0]
            for i, tl in enumerate(batch["teacher_tok_lp"]):
                out[f"kl_teacher{i}"] = (s_tok - tl).mean()     # sampled-token estimate of KL(p_s || pi_i)
        out.update(batch["stats"])
        return out

    @torch.no_grad()
    def evaluate(self, run) -> dict | None:
        """Exact full-vocabulary KL(student || teacher_i) and to the mixture on held-out prompts,
        on student samples drawn with a fixed seed (comparable from one evaluation to the next)."""
        if not self.held_out:
            return None
        d, c, tok = run.dist, self.cfg, run.tokenizer
        mine = self.held_out[d.rank::d.world]
        sums = [0.0] * (len(self.teachers) + 2)   # per teacher, mixture, token count
        student = self.sampling_model(run)   # (on every rank: a collective under FSDP)
        if mine:
            outs = sample_rollouts(student, tok, [prompt_ids(p, tok) for p in mine], n=1,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                   seed=run.cfg.seed + 0xD157)
            batch = rollout_tensors(outs, tok.pad_id)
            dev = run.dist.device
            was = student.training
            student.eval()
            try:
                logits = student(batch["input_ids"].to(dev))
            finally:
                student.train(was)
            pos = batch["labels"].to(dev) != -100
            V = self.vocab
            s = logits[pos][..., :V].float()
            for i, t in enumerate(self.teachers):
                z = t(batch["input_ids"].to(dev))[..., :V][pos].float()
                sums[i] = float(reverse_kl(s[None], z[None])) * int(pos.sum())
            mix, _ = teacher_scores(self.teachers, c.weights, batch, V, True, dev)
            sums[-2] = float(reverse_kl(s[None], mix[None], form="mixture")) * int(pos.sum())
            sums[-1] = float(pos.sum())
        tot = [sum(x) for x in zip(*gather_objects(sums, d))]
        n = max(tot[-1], 1.0)
        out = {f"heldout_kl_teacher{i}": tot[i] / n for i in range(len(self.teachers))}
        out["heldout_kl_mixture"] = tot[-2] / n
        out["heldout_kl"] = sum(w * out[f"heldout_kl_teacher{i}"] for i, w in enumerate(c.weights))
        return out


class DistillLoader(RolloutLoader):
    """Batch source of one data shard: the student's samples for the step's prompts, with the
    teachers' scores. Deterministic from (seed, step, shard): resume regenerates exactly."""

    kind = "distill"

    def __next__(self) -> dict:
        c, run, tok = self.obj.cfg, self.run, self.run.tokenizer
        ids = step_prompts(len(self.obj.prompts), c.prompts_per_step, self.calls, self.seed)
        items = [self.obj.prompts[i] for i in ids[self.index::self.n_data]]
        stats = RolloutStats()
        outs = sample_rollouts(self.obj.sampling_model(run), tok, [prompt_ids(p, tok) for p in items],
                               n=c.samples_per_prompt, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                               seed=((self.seed * 7919 + self.calls) * 1009 + self.index), stats=stats)
        self.calls += 1
        batch = rollout_tensors(outs, tok.pad_id)
        t0 = time.perf_counter()
        mix, tok_lp = teacher_scores(self.obj.teachers, c.weights, batch, self.obj.vocab,
                                     c.estimator == "full", run.dist.device)
        if mix is not None:
            batch["teacher_mix"] = torch.log_softmax(mix, -1)
        batch["teacher_tok_lp"] = tok_lp
        lengths = [len(r.tokens) for r in outs]
        st = {"generation_s": stats.seconds, "teacher_s": time.perf_counter() - t0,
              "response_len": sum(lengths) / len(lengths),
              "rollout_tokens": float(sum(len(r.prompt) + len(r.tokens) for r in outs)),
              "rollout_tok_per_s": sum(lengths) / max(stats.seconds, 1e-9)}
        batch["stats"] = {k: torch.tensor(float(v)) for k, v in st.items()}
        return batch


def distill_train_config(student_dir: str, out: str, **overrides):
    """A TrainConfig for distillation into the student in `student_dir`: LR =
    DISTILL_LR_FRACTION x the pre-training LR of its width, constant after a short warm-up, MTP
    off, evaluation every 10 steps."""
    from nanoseek.config import ModelConfig
    from nanoseek.train.presets import pretrain_lr
    from nanoseek.train.trainer import TrainConfig

    mc = ModelConfig.from_json(Path(student_dir))
    base = dict(run_dir=out, model=str(student_dir), depth=None, init_from=str(student_dir),
                tokenizer_dir=str(student_dir), seq_len=min(mc.max_position_embeddings, 1024), micro_batch=1,
                lr=DISTILL_LR_FRACTION * pretrain_lr(mc.hidden_size), warmup_steps=2, decay_frac=0.0,
                mtp_weight=0.0, mtp_weight_decay=0.0, eval_every=10, sample_prompts=[], ckpt_every=20, keep_last=2)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)
