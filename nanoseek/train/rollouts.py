"""On-policy samples for RL and distillation: prompts -> completions through nanoseek's own
engine, and completions -> the padded tensors a training step reads.

    >>> outs = sample_rollouts(model, tok, [prompt_ids], n=8, max_new_tokens=256, seed=7)
    >>> batch = rollout_tensors(outs, pad_id=tok.pad_id)    # input_ids, labels, sampler_logprobs

Generation runs on the engine's BatchRunner (continuous batching: all rows share one
preallocated decode cache, a finished row frees its slot for the next waiting one) with the
engine's sampler, on the very model object being trained -- the weights are handed over in
process, with no copy and no disk round trip (under FSDP: an unsharded copy, below). Each row
samples with its own generator seeded from (seed, row), so a step's rollouts are a pure function
of the weights and the seed: exact resume needs no sampler state, and a row's tokens do not
depend on the other rows.

By default rollouts use temperature 1 with no top-k / top-p, so the sampler's distribution is
the policy itself and the sampler's log-probabilities match the trainer's up to kernel
rounding (the truncated importance-sampling correction of grpo_loss absorbs what is left).
The stop token (EOS) is part of the completion: the policy must learn to stop.

Under FSDP (`--fsdp`) each rank holds only a shard of every parameter, and a sharded forward is
a collective that every rank must run in step -- but each rank samples its own prompts, whose
completions end after different numbers of decode steps. So there rollouts come from a full,
unsharded copy of the policy on every rank (`RolloutObjective.sampling_model`), refreshed from
the shards (one all-gather per tensor) the first time it is asked for after an optimizer step.
FSDP still shards what dominates training memory -- gradients and optimizer state; the copy
costs one set of weights per rank, as an inference engine's weights would.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from nanoseek.engine.batch import BatchRunner, Sequence
from nanoseek.engine.compiling import decode_capacity
from nanoseek.engine.sampling import SamplingParams
from nanoseek.train.objectives import Objective
from nanoseek.train.parallelize import all_reduce, unshard

IGNORE_INDEX = -100


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt: list[int]
    tokens: list[int]                 # the completion, ending with the stop token when it stopped
    logprobs: list[float]             # the sampler's log-probability of each token
    text: str                         # the completion's text (stop token excluded)
    finish_reason: str                # "stop" | "length"
    group: int = 0                    # index of its prompt in the call
    extra: dict = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutStats:
    seconds: float = 0.0
    tokens: int = 0


def _row_seed(seed: int, row: int) -> int:
    return (int(seed) * 1_000_003 + row) & ((1 << 62) - 1)


def sample_rollouts(model, tokenizer, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 256,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                    max_batch: int = 64, on_finish: Callable[[int, Rollout], None] | None = None,
                    stats: RolloutStats | None = None, stop: tuple[str, ...] = ()) -> list[Rollout]:
    """n completions of every prompt (rows ordered prompt-major: prompt i's samples are rows
    i*n .. i*n+n-1). `on_finish(row, rollout)` is called as each row finishes, so scoring can
    start while other rows still decode. `stop`: stop strings (e.g. HumanEval's for the
    completion protocol; the completion ends before the match). The model is put in eval mode
    and restored."""
    t0 = time.perf_counter()
    eos = getattr(model.config, "eos_token_id", None)
    rows = [(g, p) for g, p in enumerate(prompts) for _ in range(n)]
    longest = max(len(p) for p in prompts)
    runner = BatchRunner(model, min(max_batch, len(rows)), decode_capacity(model, longest + max_new_tokens + 1),
                         vocab_limit=tokenizer.vocab_size if tokenizer is not None else None)
    out: list[Rollout | None] = [None] * len(rows)

    def finished(i: int, s: Sequence) -> None:
        toks, lps = list(s.tokens), list(s.logprobs)
        if s.stop_token is not None:
            toks.append(s.stop_token)
            lps.append(s.stop_logprob)
        r = Rollout(prompt=rows[i][1], tokens=toks, logprobs=lps, text=s.text if tokenizer is not None else "",
                    finish_reason=s.finish_reason, group=rows[i][0])
        out[i] = r
        if on_finish is not None:
            on_finish(i, r)

    for i, (_, p) in enumerate(rows):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=_row_seed(seed, i), stop_token_ids=() if eos is None else (int(eos),),
                                stop_strings=tuple(stop), logprobs=True, logprobs_mode="sampled")
        runner.add(Sequence(p, params, tokenizer=tokenizer,
                            on_delta=lambda s, d, i=i: finished(i, s) if d.finish_reason is not None else None))
    runner.run_to_completion()
    if stats is not None:
        stats.seconds += time.perf_counter() - t0
        stats.tokens += sum(len(r.tokens) for r in out if r is not None)
    return out  # type: ignore[return-value]


def rollout_tensors(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training tensors of prompt + completion rows.

    input_ids [B, L-1] (the row without its last token), labels [B, L-1] (the next token where
    it is a completion token, else -100: prompts and padding are never targets), and
    sampler_logprobs [B, L-1] aligned with labels (0 where there is no target), token_mask
    [B, L-1] (True at the row's own tokens, False at padding: kept out of the experts' load)."""
    L = max(len(r.prompt) + len(r.tokens) for r in rollouts)
    B = len(rollouts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    slp = torch.zeros(B, L, dtype=torch.float32)
    real = torch.zeros(B, L, dtype=torch.bool)
    for b, r in enumerate(rollouts):
        p, c = len(r.prompt), len(r.tokens)
        ids[b, :p + c] = torch.tensor(r.prompt + r.tokens, dtype=torch.long)
        labels[b, p:p + c] = ids[b, p:p + c]
        slp[b, p:p + c] = torch.tensor(r.logprobs, dtype=torch.float32)
        real[b, :p + c] = True
    # position t predicts token t+1: shift the targets (and their sampler log-probs) left by one
    return {"input_ids": ids[:, :-1].contiguous(), "labels": labels[:, 1:].contiguous(),
            "sampler_logprobs": slp[:, 1:].contiguous(), "token_mask": real[:, :-1].contiguous()}


def prompt_order(n_prompts: int, seed: int, epoch: int) -> torch.Tensor:
    """A seeded permutation of the prompts for one epoch."""
    g = torch.Generator().manual_seed(_row_seed(seed, 0x5EED0000 + epoch))
    return torch.randperm(n_prompts, generator=g)


def step_prompts(n_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Prompt indices of optimizer step `step` (global, before splitting over data shards):
    consecutive slices of per-epoch permutations, wrapping into the next epoch."""
    out: list[int] = []
    start = step * per_step
    while len(out) < per_step:
        epoch, pos = divmod(start + len(out), n_prompts)
        order = prompt_order(n_prompts, seed, epoch)
        out += order[pos: pos + per_step - len(out)].tolist()
    return out


class RolloutObjective(Objective):
    """What RL and distillation share: a step's `prompts_per_step` prompts (their config's) are
    split over ranks x `micro_steps` data shards, and a step stands for its rollouts' tokens
    (prompt + completion, summed over ranks), which each batch reports in stats."""

    def micro_steps(self, cfg, world: int) -> int:
        shards = world * self.cfg.micro_steps
        if self.cfg.prompts_per_step % shards:
            raise ValueError(f"prompts_per_step {self.cfg.prompts_per_step} must be a multiple of "
                             f"world size x micro-steps = {shards}")
        return self.cfg.micro_steps

    def step_tokens(self, run, batches: list[dict]) -> int:
        n = torch.tensor([float(sum(b["stats"]["rollout_tokens"] for b in batches))], dtype=torch.float64)
        return int(all_reduce(n, run.dist).item())

    # --- the model rollouts come from (module docstring: FSDP) ---
    _policy: torch.nn.Module | None = None    # under FSDP: the unsharded copy
    _policy_step: int | None = None           # the optimizer step its weights are from

    def prepare_sampling(self, run) -> None:
        """Called by prepare(), before the model is wrapped: under FSDP, keep an unsharded copy
        of the model (its structure, buffers and dtype) to sample from."""
        if run.cfg.fsdp and run.dist.enabled:
            self._policy = copy.deepcopy(run.model).requires_grad_(False)
            self._policy_step = None

    def sampling_model(self, run) -> torch.nn.Module:
        """The model to sample (and score old log-probs) with: the trained model itself, or under
        FSDP the unsharded copy, first brought up to date with the shards when an optimizer step
        has changed them since. A collective under FSDP: every rank calls it at the same points
        (a step's first batch, evaluation), whether or not it has prompts of its own."""
        if self._policy is None:
            return run.model
        if self._policy_step != run.state.step:
            # tensor by tensor, so that no second full copy of the model is ever materialised
            own = self._policy.state_dict()   # (shares the copy's storage: copy_ updates it)
            sharded = run.model.state_dict()
            if own.keys() != sharded.keys():
                raise RuntimeError("the sampling copy no longer matches the model's parameters")
            with torch.no_grad():
                for k, v in sharded.items():
                    own[k].copy_(unshard(v))
            self._policy_step = run.state.step
        return self._policy


class RolloutLoader:
    """Base of the RL and distillation batch sources of one data shard: a batch is a function of
    (seed, call count, shard), so the state to save for exact resume is the call count alone."""

    kind = "rollout"

    def __init__(self, objective, run, index: int, n_data: int, seed: int):
        self.obj, self.run, self.index, self.n_data, self.seed = objective, run, index, n_data, seed
        self.calls = 0

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"calls": self.calls, "seed": self.seed, "index": self.index, "n_data": self.n_data}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "index", "n_data"):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"{self.kind} loader state does not match this run ({k}: saved {state.get(k)})")
        self.calls = int(state["calls"])

