"""Training objectives plugged into the one trainer loop (nanoseek/train/trainer.py).

Pre-training, SFT, RL and distillation differ only in their objective: an objective is
  * a batch source -- `make_loader(run, index, n_data, seed)` returns an iterator of batches
    (dicts of tensors) with `state_dict()` / `load_state_dict()` for exact resume; the trainer
    creates one per accumulation micro-step and rank, `index` of `n_data` (a data shard);
  * a loss -- `__call__(model, batch, phase)` returns a dict of scalar tensors whose "loss"
    entry is minimised; every other entry is logged as is (averaged over micro-steps and ranks);
  * metrics -- `val_batches(run)` (held-out batches for the validation loss / bits-per-byte),
    `step_metrics()` (extra per-step numbers) and `summary()` (extra numbers for summary.json);
  * optionally `loss_units(batch)` -- what its loss is a mean over (target tokens, sequences):
    the trainer then passes the step's total and the loss weighs itself by `step_share`, so a
    step is the mean over all of its units whatever the accumulation or world size.
The trainer does everything else: accumulation, DDP / FSDP2, clipping, schedules, the MoE bias
update, checkpoints with exact resume, the progress bar, JSONL / TensorBoard metrics, the report.

    class MyObjective(Objective):
        def __call__(self, model, batch, phase):
            ...
            return {"loss": loss, "my_term": term}

`phase` carries what changes over training: {"mtp_weight": 0.3 or 0.1, "step": int}, plus
{"loss_units", "loss_shards"} for objectives with `loss_units`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Objective:
    """Base class: subclasses implement __call__ and the batch source (module docstring)."""

    name = "objective"

    def vocab_size(self, cfg) -> int | None:
        """The vocabulary the data is written in (checked against the model), if known."""
        return None

    def prepare(self, run) -> None:
        """Called once on every rank after the model is built, before loaders are made."""

    def make_loader(self, run, index: int, n_data: int, seed: int):
        raise NotImplementedError

    def val_batches(self, run):
        """Held-out batches for this rank (an iterable), or None for no validation."""
        return None

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_metrics(self) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    # --- optional hooks for objectives whose batches are not rows of seq_len tokens ---
    progress_keys: tuple[str, ...] = ()   # step-record keys shown in the progress bar

    def micro_steps(self, cfg, world: int) -> int | None:
        """Accumulation micro-steps per rank; None: from batch_tokens / (micro_batch x seq_len)."""
        return None

    def step_tokens(self, run, batches: list[dict]) -> int | None:
        """Tokens this rank's batches of one step stand for, summed over ranks (None: batch_tokens)."""
        return None

    def loss_units(self, batch: dict) -> float | None:
        """How many units (target tokens, sequences) this batch's main loss term is a mean over,
        or None. With a number, the trainer puts the step's total over micro-steps and ranks in
        phase["loss_units"] and the objective weights its mean by `step_share`, so that the step
        minimises the mean over all of its units: changing --micro-batch, the accumulation or the
        world size does not reweight them (a micro-batch with few targets no longer counts as
        much as one with many)."""
        return None

    def evaluate(self, run) -> dict | None:
        """Extra held-out metrics at each evaluation (every rank calls it)."""
        return None


def model_loss_terms(model, batch: dict, phase: dict, balance_alpha: float, indexer_weight: float,
                     mtp_weight: float | None = None, ce_share: float = 1.0) -> dict[str, torch.Tensor]:
    """Next-token CE on batch["labels"] (-100 = not a target) + MTP + balance + indexer KL,
    each reported separately (the pre-training loss; SFT is the same with masked labels).
    `ce_share` weights the CE (a mean over this batch's targets) by `step_share`."""
    # doc_ids: packed documents attend and compress only within themselves (V4 report 3.5.3, 4.1)
    # token_mask: padded rows (SFT) keep their padding out of the experts' load
    t = model.loss(batch["input_ids"], batch.get("labels"), doc_ids=batch.get("doc_ids"),
                   mtp_weight=phase.get("mtp_weight", 0.3) if mtp_weight is None else mtp_weight,
                   balance_alpha=balance_alpha, indexer_weight=indexer_weight, token_mask=batch.get("token_mask"))
    loss = t.loss if ce_share == 1.0 else t.loss + (ce_share - 1.0) * t.ce
    out = {"loss": loss, "ce": t.ce.detach() * ce_share, "mtp": t.mtp.detach(), "balance": t.balance.detach(),
           "indexer": t.indexer.detach()}
    if t.indexer_recall is not None:  # present on every step of a model with CSA layers
        out["indexer_recall"] = t.indexer_recall
    return out


@dataclass
class PretrainObjective(Objective):
    """Next-token cross-entropy + MTP + sequence-wise balance loss + indexer KL (spec 1.6-1.7, 3)
    over packed token shards (`TrainConfig.shard_dir`, nanoseek.data.shards.TokenLoader).

    The MTP weight comes from `phase` (the trainer lowers it from 0.3 to 0.1 when LR decay
    starts, as V4 does)."""

    balance_alpha: float = 1e-4
    indexer_weight: float = 1.0
    name = "pretrain"

    def vocab_size(self, cfg) -> int:
        from nanoseek.data.shards import load_index

        self._index = load_index(cfg.shard_dir)
        return int(self._index["vocab_size"])

    def make_loader(self, run, index: int, n_data: int, seed: int):
        from nanoseek.data.shards import TokenLoader

        c = run.cfg
        return TokenLoader(c.shard_dir, "train", c.micro_batch, c.seq_len, rank=index, world_size=n_data,
                           seed=seed, fim_rate=c.fim_rate)

    def val_batches(self, run):
        from nanoseek.data.shards import TokenLoader, load_index

        c, d = run.cfg, run.dist
        index = getattr(self, "_index", None) or load_index(c.shard_dir)
        if "val" not in index["splits"] or index["splits"]["val"]["docs"] < d.world:
            return None
        limit = max(1, c.eval_tokens // (c.micro_batch * c.seq_len * d.world))

        def gen():
            ld = TokenLoader(c.shard_dir, "val", c.micro_batch, c.seq_len, rank=d.rank, world_size=d.world,
                             shuffle=False, loop=False)
            for i, b in enumerate(ld):
                if i >= limit:
                    break
                yield b

        return gen()

    def __call__(self, model, batch: dict, phase: dict) -> dict[str, torch.Tensor]:
        return model_loss_terms(model, batch, phase, self.balance_alpha, self.indexer_weight)


# =============================================================================================
# RL (GRPO family) and multi-teacher on-policy distillation: the loss math as pure functions.
#
# Nothing below touches a model or the trainer; the RL / distillation objectives call these on
# logits and log-probs they computed themselves. Conventions: B sequences, T positions, V
# vocabulary; `mask` [B, T] is True where a position is a trained (completion) token.
# All arithmetic is float32 whatever the input dtype (bf16 log-softmax over 100k+ entries loses
# the small differences the losses are made of); gradients come back in the input dtype.
# =============================================================================================

DEFAULT_CHUNK = 256  # sequence positions per chunk: B * 256 * V float32 temporaries at a time


def _as_list(teacher_logits) -> list[torch.Tensor]:
    return [teacher_logits] if isinstance(teacher_logits, torch.Tensor) else list(teacher_logits)


def teacher_weights(weights, n: int) -> list[float]:
    """Validated per-teacher weights (floats): `n` of them, non-negative, summing to 1 within
    1e-6; None means equal weights. Raises ValueError otherwise."""
    if n < 1:
        raise ValueError("need at least one teacher")
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(w) != n:
        raise ValueError(f"{len(w)} teacher weights for {n} teachers")
    if any(not x >= 0.0 for x in w):  # `not >=` also rejects NaN
        raise ValueError(f"teacher weights must be non-negative, got {w}")
    if abs(sum(w) - 1.0) > 1e-6:
        raise ValueError(f"teacher weights must sum to 1, got sum {sum(w)!r}")
    return w


def _mixture_logprobs(chunks: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """log q = m - logsumexp(m), m = sum_i w_i z_i (float32). Equal to normalising
    sum_i w_i log pi_i because each teacher's log-partition is a per-position constant that the
    final logsumexp removes -- so no per-teacher normalisation is needed at all."""
    m = chunks[0].float() * w[0]
    for wi, z in zip(w[1:], chunks[1:]):
        m.add_(z, alpha=wi)  # in place: one V-sized buffer per chunk, not one per teacher
    return m.sub_(torch.logsumexp(m, dim=-1, keepdim=True))


def _weighted_logprobs(chunks: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """sum_i w_i log pi_i (float32, not normalised): the target of the sum form."""
    m = torch.log_softmax(chunks[0].float(), dim=-1).mul_(w[0])
    for wi, z in zip(w[1:], chunks[1:]):
        m.add_(torch.log_softmax(z.float(), dim=-1), alpha=wi)
    return m


def teacher_mixture_logprobs(teacher_logits, weights=None) -> torch.Tensor:
    """The normalised log-geometric mixture of the teachers, float32 [..., V], no gradient:

        log q = sum_i w_i log pi_i - logsumexp_v(sum_i w_i log pi_i).

    KL(p || q) = sum_i w_i KL(p || pi_i) + logsumexp_v(sum_i w_i log pi_i) (expand log q), and the
    last term does not depend on the student, so distilling towards q has exactly the gradient
    of the weighted sum of per-teacher reverse KLs. By Hoelder, sum_v prod_i pi_i^w_i <= 1, so the
    constant is <= 0 and KL(p || q) <= sum_i w_i KL(p || pi_i). Materialises [..., V]; for long
    sequences use reverse_kl(form="mixture"), which works in chunks."""
    t = [x.detach() for x in _as_list(teacher_logits)]
    return _mixture_logprobs(t, teacher_weights(weights, len(t)))


def _kl_rows(s: torch.Tensor, t: list[torch.Tensor], w: list[float], form: str):
    """Per-position KL of one chunk: (kl [B, T'], p, log p - log target)."""
    logp = torch.log_softmax(s.float(), dim=-1)
    p = logp.exp()
    diff = (_weighted_logprobs(t, w) if form == "sum" else _mixture_logprobs(t, w)).neg_().add_(logp)
    return (p * diff).sum(-1), p, diff


class _ReverseKL(torch.autograd.Function):
    """Chunked reverse KL with recomputation: nothing of size [B, T, V] is kept for backward
    beyond the inputs, so memory is O(B * chunk * V) in both passes. Backward uses
    d KL(p||q) / d z_s = p * (log p - log q - KL) for every position (the softmax Jacobian),
    with the mixture as q in both forms: the two forms' gradients are identical (see
    teacher_mixture_logprobs) and the mixture is the cheaper one to compute."""

    @staticmethod
    def forward(ctx, student, mask, w, form, chunk, *teachers):
        n = mask.sum()
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for a in range(0, student.shape[1], chunk):
            b = a + chunk
            kl = _kl_rows(student[:, a:b], [t[:, a:b] for t in teachers], w, form)[0]
            total = total + (kl * mask[:, a:b]).sum()
        ctx.save_for_backward(student, mask, *teachers)
        ctx.w, ctx.chunk = w, chunk
        # zero trained positions -> 0, not 0/0 (an all-prompt micro-batch is legal)
        return total / n.clamp(min=1)

    @staticmethod
    def backward(ctx, g):
        student, mask, *teachers = ctx.saved_tensors
        scale = g.float() / mask.sum().clamp(min=1)
        grad = torch.empty_like(student)
        for a in range(0, student.shape[1], ctx.chunk):
            b = a + ctx.chunk
            kl, p, diff = _kl_rows(student[:, a:b], [t[:, a:b] for t in teachers], ctx.w, "mixture")
            gz = diff.sub_(kl.unsqueeze(-1)).mul_(p).mul_(mask[:, a:b].unsqueeze(-1) * scale)
            grad[:, a:b] = gz.to(grad.dtype)
        return (grad, None, None, None, None) + (None,) * len(teachers)


def _check_btv(student_logits: torch.Tensor, teachers: list[torch.Tensor], mask):
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got {tuple(student_logits.shape)}")
    for t in teachers:
        if t.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(t.shape)} != student {tuple(student_logits.shape)}")
    B, T, _ = student_logits.shape
    if mask is None:
        return torch.ones(B, T, dtype=torch.float32, device=student_logits.device)
    if mask.shape != (B, T):
        raise ValueError(f"mask must be [B, T] = {(B, T)}, got {tuple(mask.shape)}")
    return mask.to(device=student_logits.device, dtype=torch.float32)


def reverse_kl(student_logits: torch.Tensor, teacher_logits, weights=None, mask: torch.Tensor | None = None,
               *, chunk_size: int = DEFAULT_CHUNK, form: str = "sum") -> torch.Tensor:
    """Multi-teacher reverse KL over the full vocabulary (on-policy distillation, V4 report's
    multi-teacher OPD; Agarwal et al. 2024 GKD with beta = 1; Thinking Machines' "on-policy
    distillation"): the mean over unmasked positions of

        form="sum":     sum_i w_i KL(p_s || pi_i) = sum_i w_i sum_v p_s(v) (log p_s(v) - log pi_i(v))
        form="mixture": KL(p_s || q),  log q = sum_i w_i log pi_i - logsumexp(sum_i w_i log pi_i)

    The two differ per position by the student-independent -logsumexp_v(sum_i w_i log pi_i) >= 0
    (sum >= mixture), so their gradients are identical; "sum" is the number to report (a
    weighted average of true KLs), "mixture" is a little cheaper.

    student_logits [B, T, V] (any float dtype; differentiable); teacher_logits one tensor of the
    same shape or a list of them (detached: teachers get no gradient); weights one per teacher,
    non-negative, summing to 1 (default equal); mask [B, T] bool (default all). Returns a float32
    scalar; 0 (with a zero gradient) when no position is unmasked.

    Which is faster, and why: measured with 3 teachers, B*T = 2048, V = 4096, float32, one CPU
    thread (CPU time, best of 12 on a shared machine): forward sum ~0.060 s vs mixture ~0.045 s;
    forward + backward ~0.11-0.13 s vs ~0.095 s; building the teacher target alone is ~0.017 s
    vs ~0.010 s per chunk of 256. A naive autograd loop of three separate KL terms takes ~0.24 s
    and keeps [B, T, V] activations. Both forms log_softmax the student once and take a single
    p * (log p - target) product, since sum_i w_i KL(p||pi_i) = sum_v p (log p - sum_i w_i log pi_i).
    "sum" still needs every teacher's log-partition (n log_softmaxes over V). "mixture" needs only
    the weighted sum of the raw teacher logits and one logsumexp, because the per-teacher
    partitions cancel. Backward is the same for both: each chunk is recomputed on the mixture path
    instead of keeping [B, T, V] activations."""
    teachers = [t.detach() for t in _as_list(teacher_logits)]
    w = teacher_weights(weights, len(teachers))
    if form not in ("sum", "mixture"):
        raise ValueError(f"form must be 'sum' or 'mixture', got {form!r}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    m = _check_btv(student_logits, teachers, mask)
    return _ReverseKL.apply(student_logits, m, w, form, int(chunk_size), *teachers)


class _TokenLogprobs(torch.autograd.Function):
    """log softmax(z)[y] in float32, chunked along T with recomputation (memory O(B*chunk*V))."""

    @staticmethod
    def forward(ctx, logits, tokens, chunk):
        out = torch.empty(tokens.shape, dtype=torch.float32, device=logits.device)
        for a in range(0, logits.shape[1], chunk):
            z = logits[:, a:a + chunk].float()
            out[:, a:a + chunk] = z.gather(-1, tokens[:, a:a + chunk, None])[..., 0] - torch.logsumexp(z, -1)
        ctx.save_for_backward(logits, tokens)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        logits, tokens = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for a in range(0, logits.shape[1], ctx.chunk):
            b = a + ctx.chunk
            gz = -torch.softmax(logits[:, a:b].float(), -1) * g[:, a:b, None]  # d log p(y)/dz = onehot - p
            gz.scatter_add_(-1, tokens[:, a:b, None], g[:, a:b, None].float())
            grad[:, a:b] = gz.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits)[..., tokens]: [B, T, V], [B, T] int -> [B, T] float32, differentiable
    w.r.t. logits, without keeping a [B, T, V] float32 copy (the per-token log-probs of GRPO and
    of the sampled-token distillation estimator)."""
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"logits [B, T, V] and tokens [B, T], got {tuple(logits.shape)} and {tuple(tokens.shape)}")
    return _TokenLogprobs.apply(logits, tokens.long(), int(chunk_size))


def step_share(phase: dict, units: float) -> float:
    """Weight of a micro-batch's mean over `units` in the mean over the whole step's units
    (Objective.loss_units). The trainer divides each micro-step's loss by the accumulation count
    and DDP / FSDP average the gradients over ranks, i.e. the step averages over its
    accumulation x world micro-batches ("loss_shards"); units / total x shards turns that into
    the mean over every unit of the step. 1 where the trainer passed no total (evaluation, or
    nothing to weigh)."""
    total = phase.get("loss_units")
    if not total:
        return 1.0
    return units / total * phase["loss_shards"]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def sampled_reverse_kl_loss(student_logits: torch.Tensor, teacher_logits_or_logprobs, tokens: torch.Tensor,
                            weights=None, mask: torch.Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK):
    """Sampled-token reverse-KL estimator (on-policy distillation as RL with a per-token reward,
    Thinking Machines / Tinker): for the student's own samples y_t ~ p_s,

        A_t = -(log p_s(y_t) - sum_i w_i log pi_i(y_t))   (detached; a per-token advantage)
        loss = -mean_t(A_t * log p_s(y_t))                 over unmasked positions.

    E_y[grad loss] = E_y[(log p_s(y) - m(y)) grad log p_s(y)] = grad sum_v p_s (log p_s - m), the
    gradient of the full reverse KL (the term from differentiating log p_s inside the KL is
    E_y[grad log p_s(y)] = 0). Only the sampled token's teacher log-prob is needed, so a teacher
    served as per-token log-probs suffices.

    teacher_logits_or_logprobs: per teacher either logits [B, T, V] or the log-probs of the
    sampled tokens [B, T] (a tensor or a list; told apart by their dimension). Returns
    (loss, kl_tokens): kl_tokens [B, T] = log p_s(y_t) - sum_i w_i log pi_i(y_t), detached, 0 where
    masked -- its masked mean is an unbiased estimate of sum_i w_i KL(p_s || pi_i) for logging."""
    teachers = [t.detach() for t in _as_list(teacher_logits_or_logprobs)]
    w = teacher_weights(weights, len(teachers))
    if student_logits.dim() != 3 or tokens.shape != student_logits.shape[:2]:
        raise ValueError("student_logits must be [B, T, V] and tokens [B, T]")
    m = _check_btv(student_logits, [], mask)
    target = torch.zeros(tokens.shape, dtype=torch.float32, device=student_logits.device)
    for wi, t in zip(w, teachers):
        if t.shape == tokens.shape:
            lp = t.float()
        elif t.shape == student_logits.shape:
            lp = token_logprobs(t, tokens, chunk_size=chunk_size)
        else:
            raise ValueError(f"teacher {tuple(t.shape)} is neither [B, T] log-probs nor [B, T, V] logits")
        target = target + wi * lp
    lps = token_logprobs(student_logits, tokens, chunk_size=chunk_size)
    kl_tokens = (lps.detach() - target) * m
    loss = -_masked_mean(-kl_tokens * lps, m)
    return loss, kl_tokens


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False, eps: float = 1e-6):
    """Group-relative advantages (GRPO, DeepSeekMath eq. 3 "outcome supervision": A_i =
    (r_i - mean(r)) / std(r) for every token of completion i).

    Default is Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): mean-centred
    only, because dividing by the group's std up-weights groups that are nearly all right or all
    wrong (a question-difficulty bias). scale_by_std=True gives the original (r - mean) / (std +
    eps) with the unbiased sample std (torch.std, as common implementations use).

    rewards: [N * G] (groups contiguous) or [N, G]; group_size = G. Returns (advantages, same
    shape as rewards, float32; zero_variance [N] bool). Groups whose rewards are all equal carry
    no learning signal: their advantages are exactly 0 and they are flagged (DAPO's dynamic
    sampling drops or resamples them; counting them is a useful metric)."""
    r = rewards.float()
    if r.dim() == 1:
        if group_size < 1 or r.numel() % group_size:
            raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}")
        g = r.view(-1, group_size)
    elif r.dim() == 2 and r.shape[1] == group_size:
        g = r
    else:
        raise ValueError(f"rewards must be [N*G] or [N, G={group_size}], got {tuple(r.shape)}")
    zero_var = (g == g[:, :1]).all(dim=1)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        adv = adv / (std + eps)
    adv = torch.where(zero_var[:, None], torch.zeros_like(adv), adv)  # exact 0, not rounding noise
    return adv.reshape(rewards.shape), zero_var


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token for samples of pi (DeepSeekMath eq. 4):
    exp(ref - lp) - (ref - lp) - 1, unbiased and always >= 0."""
    d = ref_logprobs - logprobs
    return d.exp() - d - 1


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """"token": sum over every token of the batch / number of tokens (DAPO eq. 12, token-level:
    long completions are not down-weighted per token). "sequence": mean over each sequence's
    tokens, then mean over sequences that have any token (GRPO eq. 3's 1/|o_i|)."""
    if aggregation == "token":
        return _masked_mean(per_token, mask)
    if aggregation == "sequence":
        n = mask.sum(-1)
        seq = (per_token * mask).sum(-1) / n.clamp(min=1)
        has = (n > 0).float()
        return (seq * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.28, aggregation: str = "token",
              ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
              sampler_logprobs: torch.Tensor | None = None, tis_cap: float = 2.0):
    """Clipped policy-gradient loss of the GRPO family (DeepSeekMath eq. 3; DAPO eq. 8/12; Dr. GRPO).

    Per token, with r = exp(logprobs - old_logprobs) and A the (detached) advantage:
        l_t = -w_t * min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + kl_coef * k3_t
      * clip-higher (DAPO 3.1): clip_high 0.28 > clip_low 0.2 leaves more room to raise
        unlikely tokens' probability (against entropy collapse);
      * k3_t = k3_kl(logprobs, ref_logprobs) (DeepSeekMath eq. 4), only when ref_logprobs is
        given; kl_coef defaults to 0 (DAPO and Dr. GRPO drop the KL term);
      * w_t = min(exp(old - sampler), tis_cap), detached: truncated importance sampling (Yao et al.
        2025, "Your efficient RL framework secretly brings you off-policy RL training") for the
        mismatch between the inference engine that sampled (sampler_logprobs) and the trainer's
        own old log-probs; it weights the policy-gradient term only (the sample came from the
        sampler; the KL penalty is a regulariser on the current policy). 1 when not given.
    Aggregation over masked tokens: "token" (DAPO, default) or "sequence" (GRPO), see _aggregate.

    logprobs [B, T] (differentiable), old_logprobs / ref_logprobs / sampler_logprobs [B, T]
    (detached here), advantages [B] (per sequence) or [B, T], mask [B, T].

    One update per batch: with old_logprobs = logprobs.detach() the ratio is exactly 1, nothing
    clips, and the gradient is that of the policy gradient -A * logprobs aggregated the same way
    (r's gradient is r * grad logprobs = grad logprobs at r = 1).

    Returns (loss, metrics) with detached scalar metrics (token means over the mask):
    clip_fraction (share of tokens whose clipped branch is active: r > 1 + clip_high with A > 0
    or r < 1 - clip_low with A < 0 -- their gradient is 0), approx_kl (k3 of KL(old || current):
    (r - 1) - log r), ratio_mean, and k3_kl / tis_weight_mean when those inputs are given."""
    m = mask.to(dtype=torch.float32)
    lp = logprobs.float()
    log_ratio = lp - old_logprobs.detach().float()
    ratio = log_ratio.exp()
    adv = advantages.detach().float()
    if adv.dim() == 1:
        adv = adv[:, None]
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if sampler_logprobs is not None:
        tis = (old_logprobs.detach().float() - sampler_logprobs.detach().float()).exp().clamp(max=tis_cap)
        per_token = per_token * tis
        metrics["tis_weight_mean"] = _masked_mean(tis, m)
    if ref_logprobs is not None:
        k3 = k3_kl(lp, ref_logprobs.detach().float())
        per_token = per_token + kl_coef * k3
        metrics["k3_kl"] = _masked_mean(k3.detach(), m)
    loss = _aggregate(per_token, m, aggregation)
    with torch.no_grad():
        active = ((ratio > 1.0 + clip_high) & (adv > 0)) | ((ratio < 1.0 - clip_low) & (adv < 0))
        metrics["clip_fraction"] = _masked_mean(active.float(), m)
        metrics["approx_kl"] = _masked_mean(ratio - 1.0 - log_ratio, m)
        metrics["ratio_mean"] = _masked_mean(ratio, m)
    return loss, metrics


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the task reward: 0 for lengths up to
    max_len - buffer, then linearly down to -1 at max_len, -1 beyond.

    The alternative, DAPO's overlong filtering, drops truncated completions from the loss
    instead (overlong_filter_mask). The penalty is the default choice here: it keeps every
    sample and tells the policy *why* it lost reward; filtering is for when truncation says
    nothing about quality (e.g. a too-small max_len during early experiments). The two combine:
    penalise inside the buffer and filter what hit the hard limit."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    excess = lengths.float() - (max_len - buffer)
    return -(excess / buffer).clamp(0.0, 1.0)


def overlong_filter_mask(mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO's overlong filtering: mask [B, T] with every token of a truncated completion
    (truncated [B] bool) removed, so cut-off samples neither reward nor punish the policy."""
    return mask.bool() & ~truncated.bool()[:, None]
