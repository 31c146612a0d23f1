"""GRPO on sandboxed unit tests (or any plug-in reward): RL as one more objective on the one
trainer loop.

    nanoseek rl --model runs/sft/model --tasks tasks.jsonl --out runs/rl
    nanoseek rl --model M --tasks prompts.jsonl --reward my_rewards.py:brevity --protocol completion

One optimizer step (per data shard: the step's prompts are split over ranks x micro-steps):
  1. rollouts -- `group_size` completions of each of the shard's prompts from the current policy
     through nanoseek's engine (rollouts.py: continuous batching, the engine's sampler,
     temperature 1 and no top-k/top-p by default, the sampler's log-probs kept), on the model
     object being trained: weights are handed over in process after every update;
  2. rewards -- each row is submitted to the reward as soon as it finishes generating
     (nanoseek.eval.rewards: the code reward runs the task's test in the eval sandbox through
     the scoring path of `nanoseek eval humaneval`, on a worker pool, so scoring overlaps the
     rows still decoding); completions cut by the token limit are masked out of the loss
     (DAPO's overlong filtering; `--overlong penalty`: its soft length penalty instead);
  3. advantages -- group-relative, mean-centred (Dr. GRPO; `--scale-by-std` for GRPO's std
     division); groups whose rewards are all equal carry no signal: they are dropped from the
     loss and counted (`--resample-zero-variance N` samples them again, up to N times);
  4. update -- the clipped GRPO loss (objectives.grpo_loss: clip-higher 0.2 / 0.28, token-level
     aggregation by default, truncated importance sampling against the sampler's log-probs,
     optional k3 KL to the frozen initial policy), plus the MoE balance loss; the router-bias
     update and gradient clipping are the trainer's. `--updates-per-batch K` reuses a batch for
     K optimizer steps (the PPO ratio then moves away from 1 and clipping matters).
Logged per step: reward per term, pass rate, entropy, KL to the reference, response length,
clip fraction, share of zero-variance groups, truncation, and the time split (generation /
scoring / update); every `--eval-every` steps held-out pass@1 and pass@k (k = --eval-samples).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanoseek.chat_format import encode_ids
from nanoseek.eval import humaneval
from nanoseek.eval.chat_code import request_for
from nanoseek.eval.common import read_jsonl
from nanoseek.eval.passk import pass_at_ks
from nanoseek.eval.rewards import RewardConfig, make_reward
from nanoseek.train.config_checks import FLOAT, INT, check_ranges
from nanoseek.train.objectives import (group_advantages, grpo_loss, overlong_filter_mask,
                                       overlong_penalty, step_share, token_logprobs)
from nanoseek.train.parallelize import all_reduce, gather_objects
from nanoseek.train.rollouts import (RolloutLoader, RolloutObjective, RolloutStats, rollout_tensors, sample_rollouts,
                                     step_prompts)

# RL learning rate as a share of the pre-training LR of the model's width (presets.pretrain_lr):
# policy-gradient steps are noisy and a collapsed policy does not recover, so RL moves the
# weights more gently than pre-training; 0.3 still lets a CPU-sized model move measurably in a
# few minutes of steps (Muon's step size does not shrink with the gradient's noise).
RL_LR_FRACTION = 0.3


@dataclass
class RLConfig:
    """What `nanoseek rl` samples, how it rewards and how the GRPO loss is formed (defaults:
    module docstring); the loop's settings are a TrainConfig."""

    tasks: str = ""
    held_out: str | None = None        # default: TASKS with .heldout before .jsonl, if it exists
    reward: str = "code"               # "code" or "module:function" / "path.py:function"
    protocol: str = "chat"             # chat: the task as a user message; completion: continue the prompt
    group_size: int = 8
    prompts_per_step: int = 4          # global, split over ranks x micro-steps
    micro_steps: int = 1               # accumulation micro-steps per rank
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    scale_by_std: bool = False
    aggregation: str = "token"
    clip_low: float = 0.2
    clip_high: float = 0.28
    updates_per_batch: int = 1
    kl_coef: float = 0.0
    tis_cap: float = 2.0
    overlong: str = "mask"             # mask | penalty | none
    overlong_buffer: int | None = None  # default max_new_tokens // 4
    resample_zero_variance: int = 0
    partial_credit: bool = False
    syntax_weight: float = 0.0
    format_weight: float = 0.0
    length_weight: float = 0.0
    mtp_weight: float = 0.0
    eval_tasks: int = 32
    eval_samples: int = 4
    reward_workers: int | None = None

    def check(self) -> None:
        """ValueError naming every out-of-range setting (group_size >= 2: advantages are
        relative to the group)."""
        check_ranges(self, "RLConfig", _RL_INTS, _RL_FLOATS, _RL_CHOICES)


_RL_INTS = {
    "group_size": INT(2), "prompts_per_step": INT(1), "micro_steps": INT(1), "max_new_tokens": INT(1),
    "top_k": INT(0), "updates_per_batch": INT(1), "overlong_buffer": INT(0, optional=True),
    "resample_zero_variance": INT(0), "eval_tasks": INT(0), "eval_samples": INT(1),
    "reward_workers": INT(1, optional=True),
}
_RL_FLOATS = {
    "temperature": FLOAT(0, open_lo=True), "top_p": FLOAT(0, 1, open_lo=True), "clip_low": FLOAT(0),
    "clip_high": FLOAT(0), "kl_coef": FLOAT(0), "tis_cap": FLOAT(0, open_lo=True), "mtp_weight": FLOAT(0),
    # shaping terms: any finite weight (a negative one penalises)
    "syntax_weight": FLOAT(-math.inf), "format_weight": FLOAT(-math.inf), "length_weight": FLOAT(-math.inf),
}
_RL_CHOICES = {"protocol": ("chat", "completion"), "overlong": ("penalty", "mask", "none"),
               "aggregation": ("token", "sequence")}


def read_tasks(path: str | Path) -> list[dict]:
    """Tasks from JSONL: every line an object with at least a "prompt" string."""
    out = []
    for t in read_jsonl(path):
        n = t.pop("_line")
        if not isinstance(t.get("prompt"), str):
            raise ValueError(f'{path}:{n}: a task needs a "prompt" string')
        t.setdefault("task_id", f"{Path(path).stem}/{n}")
        out.append(t)
    if not out:
        raise ValueError(f"{path}: no tasks")
    return out


def default_held_out(tasks_path: str) -> str | None:
    p = Path(tasks_path)
    cand = p.with_name(p.stem + ".heldout" + p.suffix)
    return str(cand) if cand.is_file() else None


class RLObjective(RolloutObjective):
    """GRPO (module docstring) on the one trainer loop."""

    name = "rl"
    progress_keys = ("reward", "pass_rate", "zero_var_groups")

    def __init__(self, cfg: RLConfig, balance_alpha: float = 1e-4, indexer_weight: float = 1.0):
        cfg.check()
        self.cfg = cfg
        self.balance_alpha, self.indexer_weight = balance_alpha, indexer_weight
        self.tasks: list[dict] = []
        self.held_out: list[dict] = []
        self.reward = None
        self.ref = None
        self.zero_var_total = 0
        self._dist = None  # the run's ranks (prepare), for the totals in summary()

    # --- set-up ---
    def prepare(self, run) -> None:
        if run.tokenizer is None:
            raise ValueError("RL needs the model's tokenizer (tokenizer files in the model directory, or --tokenizer)")
        c = self.cfg
        self._dist = run.dist
        self.tasks = read_tasks(c.tasks)
        held = c.held_out or default_held_out(c.tasks)
        self.held_out = read_tasks(held)[: c.eval_tasks] if held else []
        rc = RewardConfig(protocol=c.protocol, partial_credit=c.partial_credit, syntax=c.syntax_weight,
                          format=c.format_weight, length=c.length_weight, workers=c.reward_workers)
        self.reward = make_reward(c.reward, rc)
        if c.reward == "code":
            # every task scorable before the first rollout: a broken test would otherwise stop
            # the run with a traceback at its first reward
            for t in (*self.tasks, *self.held_out):
                why = humaneval.problem_error(t)
                if why:
                    raise ValueError(f"the code reward cannot score task {t['task_id']!r}: {why}")
        if c.kl_coef > 0:   # the frozen initial policy
            self.ref = copy.deepcopy(run.model).eval().requires_grad_(False)
        self.prepare_sampling(run)

    def prompt_ids(self, task: dict, tokenizer) -> list[int]:
        if self.cfg.protocol == "completion":
            return tokenizer.encode(task["prompt"], add_bos=True)
        text = request_for(task) if self.cfg.reward == "code" else (task.get("request") or task["prompt"])
        return encode_ids([{"role": "user", "content": text}], tokenizer, thinking_mode="chat")[0]

    @property
    def stop(self) -> tuple[str, ...]:
        """Completion protocol with the code reward: HumanEval's stop strings end a function body."""
        return tuple(humaneval.STOP) if self.cfg.protocol == "completion" and self.cfg.reward == "code" else ()

    def make_loader(self, run, index: int, n_data: int, seed: int) -> "RLLoader":
        return RLLoader(self, run, index, n_data, seed)

    def loss_units(self, batch: dict) -> float:
        """The policy-gradient term's units: loss tokens ("token", DAPO's mean over every token of
        the step's batch) or sequences that have any ("sequence")."""
        m = batch["mask"]
        return float(m.sum() if self.cfg.aggregation == "token" else (m.sum(-1) > 0).sum())

    # --- the loss ---
    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        c = self.cfg
        t = model.loss(batch["input_ids"], batch["labels"], mtp_weight=c.mtp_weight, balance_alpha=self.balance_alpha,
                       indexer_weight=self.indexer_weight, return_logits=True, token_mask=batch.get("token_mask"))
        lp = token_logprobs(t.logits, batch["labels"].clamp(min=0))
        old = batch.get("old_logprobs")
        pg, m = grpo_loss(lp, lp.detach() if old is None else old, batch["advantages"], batch["mask"],
                          clip_low=c.clip_low, clip_high=c.clip_high, aggregation=c.aggregation,
                          ref_logprobs=batch.get("ref_logprobs"), kl_coef=c.kl_coef,
                          sampler_logprobs=batch["sampler_logprobs"], tis_cap=c.tis_cap)
        pg = pg * step_share(phase, self.loss_units(batch))   # the step's token (sequence) mean
        loss = pg + self.balance_alpha * t.balance + self.indexer_weight * t.indexer + c.mtp_weight * t.mtp
        out = {"loss": loss, "pg_loss": pg.detach(), "balance": t.balance.detach(), "indexer": t.indexer.detach(),
               "entropy": _entropy(t.logits.detach(), batch["labels"] != -100), **m}
        out.update(batch["stats"])
        return out

    # --- held-out evaluation ---
    def evaluate(self, run) -> dict | None:
        if not self.held_out:
            return None
        d, c = run.dist, self.cfg
        mine = self.held_out[d.rank::d.world]
        results: list[tuple[int, int, float]] = []
        policy = self.sampling_model(run)   # (on every rank: a collective under FSDP)
        if mine:
            n = c.eval_samples
            outs = sample_rollouts(policy, run.tokenizer, [self.prompt_ids(t, run.tokenizer) for t in mine],
                                   n=n, max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                   top_p=c.top_p, top_k=c.top_k, seed=run.cfg.seed + 0xE7A1, stop=self.stop)
            terms = self.reward.score([mine[r.group] for r in outs], [r.text for r in outs],
                                      [len(r.tokens) for r in outs])
            for g in range(len(mine)):
                rows = terms[g * n:(g + 1) * n]
                results.append((n, sum(int(x.get("pass", x["total"]) >= 1.0) for x in rows),
                                sum(x["total"] for x in rows) / n))
        allres = [x for part in gather_objects(results, d) for x in part]
        ns, cs, rs = zip(*allres)
        out = {"heldout_reward": sum(rs) / len(rs), "heldout_tasks": len(allres)}
        if self.cfg.reward == "code":
            out.update({f"heldout_{k}": v for k, v in pass_at_ks(ns, cs, sorted({1, c.eval_samples})).items()})
        return out

    def summary(self) -> dict:
        """Totals over every rank (each samples its own share of the prompts). Collective:
        trainer.finish calls it on all ranks."""
        d, total = self._dist, self.zero_var_total
        if d is not None and d.enabled:  # a tensor all-reduce, as the trainer's own totals
            total = int(all_reduce(torch.tensor(float(total)), d).item())
        return {"zero_variance_groups": total}

    def close(self) -> None:
        if self.reward is not None:
            self.reward.close()


def _entropy(logits: torch.Tensor, mask: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Mean entropy (nats) of the policy over the masked positions, computed in chunks."""
    tot = logits.new_zeros((), dtype=torch.float32)
    for s in range(0, logits.shape[1], chunk):
        lp = torch.log_softmax(logits[:, s:s + chunk].float(), dim=-1)
        ent = -(lp.exp() * lp).sum(-1)
        tot = tot + (ent * mask[:, s:s + chunk]).sum()
    return tot / mask.sum().clamp(min=1)


class RLLoader(RolloutLoader):
    """The batch source of one data shard: each step's rollouts, rewards and advantages as
    training tensors (reused `updates_per_batch` times). Deterministic from (seed, step, shard):
    a resumed run regenerates exactly the batches it would have made."""

    kind = "RL"

    def __init__(self, objective: RLObjective, run, index: int, n_data: int, seed: int):
        super().__init__(objective, run, index, n_data, seed)
        self._cached: tuple[int, dict] | None = None
        self.zero_var = 0   # zero-variance groups of this shard's batches (saved: the summary's total)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "zero_var": self.zero_var}

    def __next__(self) -> dict:
        k = self.obj.cfg.updates_per_batch
        step = self.calls // k
        if self._cached is None or self._cached[0] != step:
            self._cached = (step, self._make(step))
        self.calls += 1
        return self._cached[1]

    def _rollout_seed(self, step: int, attempt: int) -> int:
        h = hashlib.blake2b(f"{self.seed}:{step}:{self.index}:{attempt}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 2

    def _sample(self, tasks: list[dict], step: int, attempt: int, timing: dict) -> tuple[list, list[dict]]:
        """Rollouts of `tasks` (G each) and their reward terms; rows are scored as they finish."""
        c, tok = self.obj.cfg, self.run.tokenizer
        futures: dict[int, object] = {}
        stats = RolloutStats()

        def on_finish(i, r):
            futures[i] = self.obj.reward.submit(tasks[r.group], r.text, len(r.tokens))

        outs = sample_rollouts(self.obj.sampling_model(self.run), tok, [self.obj.prompt_ids(t, tok) for t in tasks],
                               n=c.group_size, max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                               top_k=c.top_k, seed=self._rollout_seed(step, attempt), on_finish=on_finish,
                               stats=stats, stop=self.obj.stop)
        t0 = time.perf_counter()
        terms = self.obj.reward.gather([futures[i] for i in range(len(outs))])
        timing["generation_s"] += stats.seconds
        timing["scoring_wait_s"] += time.perf_counter() - t0
        return outs, terms

    def _make(self, step: int) -> dict:
        c = self.obj.cfg
        ids = step_prompts(len(self.obj.tasks), c.prompts_per_step, step, self.seed)
        tasks = [self.obj.tasks[i] for i in ids[self.index::self.n_data]]
        timing = {"generation_s": 0.0, "scoring_wait_s": 0.0}
        outs, terms = self._sample(tasks, step, 0, timing)
        totals = self._totals(outs, terms)
        _, zero = group_advantages(torch.tensor(totals), c.group_size)
        for attempt in range(1, c.resample_zero_variance + 1):   # DAPO's dynamic sampling, bounded
            redo = [g for g in range(len(tasks)) if zero[g]]
            if not redo:
                break
            o2, t2 = self._sample([tasks[g] for g in redo], step, attempt, timing)
            for j, g in enumerate(redo):
                span = slice(g * c.group_size, (g + 1) * c.group_size)
                outs[span] = [dataclasses.replace(r, group=g) for r in o2[j * c.group_size:(j + 1) * c.group_size]]
                terms[span] = t2[j * c.group_size:(j + 1) * c.group_size]
            totals = self._totals(outs, terms)
            _, zero = group_advantages(torch.tensor(totals), c.group_size)
        return self._batch(outs, terms, totals, timing)

    def _totals(self, outs, terms: list[dict]) -> list[float]:
        c = self.obj.cfg
        totals = [t["total"] for t in terms]
        if c.overlong == "penalty":
            buf = c.overlong_buffer or max(1, c.max_new_tokens // 4)
            pen = overlong_penalty(torch.tensor([len(r.tokens) for r in outs]), c.max_new_tokens, buf)
            for t, p in zip(terms, pen.tolist()):
                t["overlong"] = p
            totals = [x + p for x, p in zip(totals, pen.tolist())]
        return totals

    def _batch(self, outs, terms: list[dict], totals: list[float], timing: dict) -> dict:
        c, run = self.obj.cfg, self.run
        adv, zero = group_advantages(torch.tensor(totals), c.group_size)
        self.zero_var += int(zero.sum())
        self.obj.zero_var_total += int(zero.sum())
        batch = rollout_tensors(outs, run.tokenizer.pad_id)
        keep = ~zero.repeat_interleave(c.group_size)           # zero-variance groups leave the loss
        mask = (batch["labels"] != -100) & keep[:, None]
        truncated = torch.tensor([r.truncated for r in outs])
        if c.overlong == "mask":
            mask = overlong_filter_mask(mask, truncated)
        failed = torch.tensor([r.finish_reason == "error" for r in outs])   # the engine ended the row
        mask = mask & ~failed[:, None]
        batch.update(advantages=adv, mask=mask)
        dev = run.dist.device
        if c.updates_per_batch > 1 or self.obj.ref is not None:
            with torch.no_grad():
                with run.autocast():          # the precision of the training forward
                    if c.updates_per_batch > 1:   # the policy before this batch's first update
                        batch["old_logprobs"] = _logprobs(self.obj.sampling_model(run), batch, dev)
                    if self.obj.ref is not None:
                        batch["ref_logprobs"] = _logprobs(self.obj.ref, batch, dev)
        names = sorted({k for t in terms for k in t})
        stats = {f"reward_{k}" if k != "total" else "reward": sum(t.get(k, 0.0) for t in terms) / len(terms)
                 for k in names}
        if "pass" in names:
            stats["pass_rate"] = stats.pop("reward_pass")
        lengths = [len(r.tokens) for r in outs]
        stats.update(zero_var_groups=float(zero.float().mean()), response_len=sum(lengths) / len(lengths),
                     failed_rows=float(failed.float().mean()),
                     truncated=float(truncated.float().mean()), rollout_tokens=float(sum(
                         len(r.prompt) + len(r.tokens) for r in outs)), **timing,
                     rollout_tok_per_s=sum(lengths) / max(timing["generation_s"], 1e-9))
        batch["stats"] = {k: torch.tensor(float(v)) for k, v in stats.items()}
        return batch

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.calls % self.obj.cfg.updates_per_batch:
            raise ValueError("this checkpoint was written in the middle of a reused batch; resume needs "
                             "checkpoints at multiples of --updates-per-batch")
        self.zero_var = int(state.get("zero_var", 0))   # (older checkpoints: counted from here on)
        self.obj.zero_var_total += self.zero_var


@torch.no_grad()
def _logprobs(model, batch: dict, device) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        logits = model(batch["input_ids"].to(device))
    finally:
        model.train(was)
    return token_logprobs(logits, batch["labels"].to(device).clamp(min=0)).cpu()


def rl_train_config(model_dir: str, out: str, rl: RLConfig, **overrides):
    """A TrainConfig for RL of the model in `model_dir`: LR = RL_LR_FRACTION x the pre-training
    LR of its width, constant after a short warm-up, evaluation every 10 steps, MTP off."""
    from nanoseek.config import ModelConfig
    from nanoseek.train.presets import pretrain_lr
    from nanoseek.train.trainer import TrainConfig

    mc = ModelConfig.from_json(Path(model_dir))
    base = dict(run_dir=out, model=str(model_dir), depth=None, init_from=str(model_dir), tokenizer_dir=str(model_dir),
                seq_len=min(mc.max_position_embeddings, 1024), micro_batch=1,
                lr=RL_LR_FRACTION * pretrain_lr(mc.hidden_size), warmup_steps=2, decay_frac=0.0,
                mtp_weight=rl.mtp_weight, mtp_weight_decay=rl.mtp_weight, eval_every=10,
                sample_prompts=[], ckpt_every=max(10, rl.updates_per_batch), keep_last=2)
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base["ckpt_every"] % rl.updates_per_batch:
        raise ValueError("--ckpt-every must be a multiple of --updates-per-batch (a checkpoint between two "
                         "updates of one batch could not resume exactly)")
    return TrainConfig(**base)

