"""Scale presets derived from one dial, `depth` (in the spirit of nanochat's `--depth`).

    >>> from nanoseek.train.presets import scaled_model_config, scaled_train_defaults
    >>> cfg = scaled_model_config(depth=4, vocab_size=4096, seq_len=256)
    >>> scaled_train_defaults(depth=4, seq_len=256)["lr"]

Every DeepSeek-V4 structural feature is kept at every size (mHC, sliding + CSA + HCA layers,
the lightning indexer, hash + learned MoE layers, a shared expert, MTP); only the widths and
counts follow the dial. The derivations are commented where they are made.
"""

from __future__ import annotations

import math

from nanoseek.config import CSA, HASH_MOE, HCA, MOE, SLIDING, ModelConfig


def scaled_model_config(depth: int, vocab_size: int, seq_len: int = 512) -> ModelConfig:
    if depth < 2:
        raise ValueError("depth must be >= 2 (one sliding-window layer + at least one compressed layer)")
    # width: 64 channels per layer of depth (nanochat's aspect ratio), so width and depth grow together
    hidden = 64 * depth
    # heads of 64 channels (a multiple of the 64-channel width step); at least 2
    head_dim = 64
    heads = max(2, hidden // head_dim)
    # partial RoPE on 1/4 of each head (V4 uses 64 of 512 = 1/8; small heads need more rotary channels)
    rope_dim = head_dim // 4
    # low-rank query / grouped output projections at half the width, as V4 (1024 of 4096 for q is 1/4,
    # but tiny models lose too much at 1/4)
    q_lora = hidden // 2
    o_groups = 2 if heads % 2 == 0 else 1
    o_lora = hidden // 2
    # attention schedule: one sliding-window layer first (V4 Flash starts with pure-window layers),
    # then CSA / HCA alternating
    layers = [SLIDING] + [CSA if i % 2 == 0 else HCA for i in range(depth - 1)]
    # window and compression rates scale with the context: window = seq/8 (>= 16), CSA m = 4 as in V4,
    # HCA m' = seq/32 (>= 8) so an HCA layer always sees a few dozen entries
    window = max(16, min(128, seq_len // 8))
    hca_rate = max(8, min(128, seq_len // 32))
    # indexer: top-k over CSA entries keeps ~1/4 of them at the training length (V4: 512 of 16K/4)
    index_topk = max(8, seq_len // 16)
    # experts: 8 routed + 1 shared, top-2, growing by 4 per 4 layers of depth; fine-grained
    # experts at half the width (V4: 2048 of 4096)
    n_experts = 8 + 4 * ((depth - 4) // 4 if depth >= 4 else 0)
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
        head_dim=head_dim, qk_rope_head_dim=rope_dim, q_lora_rank=q_lora, o_groups=o_groups, o_lora_rank=o_lora,
        sliding_window=window, layer_types=layers, csa_compress_rate=4, hca_compress_rate=hca_rate,
        rope_scaling=None, max_position_embeddings=max(4 * seq_len, 2048),
        index_n_heads=max(2, heads // 2), index_head_dim=64, index_topk=index_topk,
        n_routed_experts=n_experts, num_experts_per_tok=2, moe_intermediate_size=hidden // 2,
        routed_scaling_factor=1.5,
        # the first layer hash-routed (V4: first 3 of 43), the rest learned
        mlp_layer_types=[HASH_MOE] + [MOE] * (depth - 1), num_nextn_predict_layers=1,
    )


def pretrain_lr(hidden_size: int) -> float:
    """Peak pre-training LR of a model of this width: ~ 1/sqrt(width), 3e-3 at width 256 -- a
    starting point, not a tuned value (4.6e-3 at depth 3 gave loss spikes in a CPU speedrun);
    the 0.18 RMS rescale lets Muon and AdamW share it. SFT / RL take fractions of it."""
    return 3e-3 * math.sqrt(256 / hidden_size)


def scaled_train_defaults(depth: int, seq_len: int = 512) -> dict:
    """Batch, LR and warm-up that follow the dial."""
    hidden = 64 * depth
    lr = pretrain_lr(hidden)
    # batch: ~16K tokens at depth 4, doubling every 4 layers (larger models tolerate larger batches)
    batch_tokens = 2 ** (14 + max(0, (depth - 4) // 4))
    batch_tokens = max(batch_tokens, seq_len)
    return {"lr": lr, "batch_tokens": batch_tokens, "warmup_steps": 20 + 5 * depth}
