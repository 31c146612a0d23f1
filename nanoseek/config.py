"""ModelConfig: the one configuration object of the DeepSeek-V4 model, and the preset table.

`ModelConfig` reads and writes the official DeepSeek-V4 `config.json`. Two key styles exist in the
wild and both are accepted on read:

* the official release style: `compress_ratios` (one int per layer, plus one for each MTP layer;
  0 = sliding window only, 4 = CSA, 128 = HCA), `num_hash_layers`, `qk_rope_head_dim`,
  `rope_scaling` (YaRN for the compressed layers);
* the transformers style: `layer_types`, `mlp_layer_types`, `compress_rates`, `rope_parameters`.

On write, both styles are emitted side by side, so the file loads in the official inference
code, in transformers' `DeepseekV4ForCausalLM` and here. Presets are a name -> config table
(gpt-fast style): `tiny` (tests), `small` (the benchmark config, ~70M total / ~25M active),
`flash` and `pro` (the real V4 dimensions, spec section 0).

Try it: `nanoseek info flash`, or `ModelConfig.from_preset("tiny")`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .jsonl import read_json

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"


@dataclass
class ModelConfig:
    # --- vocabulary and trunk ---
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None
    max_position_embeddings: int = 1048576
    # --- attention (spec 1.3) ---
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64  # RoPE on the *last* qk_rope_head_dim channels of every head
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    sliding_window: int = 128
    # per-layer attention type; len == num_hidden_layers
    layer_types: list[str] = field(default_factory=list)
    # attention type of each MTP block (official configs give it as the trailing compress_ratios entry)
    mtp_layer_types: list[str] = field(default_factory=list)
    csa_compress_rate: int = 4  # m  (spec 1.4)
    hca_compress_rate: int = 128  # m'
    # --- RoPE (spec 1.3 item 3) ---
    rope_theta: float = 10000.0  # sliding-window layers and MTP
    compress_rope_theta: float = 160000.0  # CSA / HCA layers
    rope_scaling: dict | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    # --- lightning indexer (spec 1.5) ---
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # --- MoE (spec 1.6) ---
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    swiglu_limit: float = 10.0
    mlp_layer_types: list[str] = field(default_factory=list)
    # --- mHC (spec 1.2) ---
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # --- MTP (spec 1.7) ---
    num_nextn_predict_layers: int = 1
    # --- carried through untouched (e.g. the official FP8 quantization_config) ---
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._check_sizes()   # before anything is built from them (a hostile config.json)
        n = self.num_hidden_layers
        if not self.layer_types:
            # transformers' default schedule: 2x HCA then alternating HCA / CSA
            self.layer_types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        if not self.mlp_layer_types:
            self.mlp_layer_types = [HASH_MOE] * min(n, 3) + [MOE] * max(0, n - 3)
        if len(self.mtp_layer_types) != self.num_nextn_predict_layers:
            self.mtp_layer_types = [SLIDING] * self.num_nextn_predict_layers
        self.validate()

    # ------------------------------------------------------------------ checks
    # every size an int in [low, high]: the highs are far above the released models' (Pro: 61
    # layers, width 7168, 384 experts, a 129,280 vocabulary) and keep a hostile config.json from
    # building a list of 10^9 layer types, or a model, before any weight is read
    SIZE_BOUNDS = {
        "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024),
        "num_attention_heads": (1, 1024), "head_dim": (1, 4096), "qk_rope_head_dim": (0, 4096),
        "q_lora_rank": (1, 1 << 16), "o_groups": (1, 1024), "o_lora_rank": (1, 1 << 16),
        "sliding_window": (1, 1 << 20), "max_position_embeddings": (1, 1 << 30),
        "csa_compress_rate": (1, 1 << 16), "hca_compress_rate": (1, 1 << 16), "index_n_heads": (1, 1024),
        "index_head_dim": (1, 4096), "index_topk": (1, 1 << 20), "n_routed_experts": (1, 1 << 14),
        "n_shared_experts": (0, 16), "num_experts_per_tok": (1, 1 << 14), "moe_intermediate_size": (1, 1 << 17),
        "hc_mult": (1, 64), "hc_sinkhorn_iters": (1, 1024), "num_nextn_predict_layers": (0, 16),
    }

    def _check_sizes(self) -> None:
        bad = [f"{k}={getattr(self, k)!r} (an int in [{lo}, {hi}])" for k, (lo, hi) in self.SIZE_BOUNDS.items()
               if not (isinstance(getattr(self, k), int) and not isinstance(getattr(self, k), bool)
                       and lo <= getattr(self, k) <= hi)]
        if bad:
            raise ValueError("invalid ModelConfig: " + "; ".join(bad))

    def validate(self) -> None:
        problems = []
        n = self.num_hidden_layers
        if len(self.layer_types) != n:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {n} layers")
        if len(self.mlp_layer_types) != n:
            problems.append(f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {n} layers")
        for t in list(self.layer_types) + list(self.mtp_layer_types):
            if t not in LAYER_TYPES:
                problems.append(f"unknown attention layer type {t!r} (expected one of {LAYER_TYPES})")
        for t in self.mlp_layer_types:
            if t not in (HASH_MOE, MOE):
                problems.append(f"unknown MoE layer type {t!r}")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            problems.append("qk_rope_head_dim must be even and <= head_dim")
        if self.qk_rope_head_dim > self.index_head_dim:
            problems.append("qk_rope_head_dim must be <= index_head_dim")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            problems.append("num_attention_heads * head_dim must be divisible by o_groups")
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append("num_experts_per_tok > n_routed_experts")
        if self.n_shared_experts != 1:
            problems.append("DeepSeek-V4 has exactly one shared expert (n_shared_experts=1)")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            problems.append(f"unknown scoring_func {self.scoring_func!r}")
        if self.csa_compress_rate < 1 or self.hca_compress_rate < 1:
            problems.append("compress rates must be >= 1")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ------------------------------------------------------------- derived
    def compress_rate(self, layer_type: str) -> int:
        return {SLIDING: 0, CSA: self.csa_compress_rate, HCA: self.hca_compress_rate}[layer_type]

    @property
    def num_hash_layers(self) -> int:
        return sum(t == HASH_MOE for t in self.mlp_layer_types)

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) not in ("yarn",):
            return None
        return rs

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ JSON I/O
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict = {}
        n = int(d.get("num_hidden_layers", cls.num_hidden_layers))
        n_mtp = int(d.get("num_nextn_predict_layers", 1))
        # compress rates: transformers' dict, then legacy scalars
        rates = d.pop("compress_rates", None) or {}
        kw["csa_compress_rate"] = int(rates.get(CSA, d.pop("compress_rate_csa", 4)))
        kw["hca_compress_rate"] = int(rates.get(HCA, d.pop("compress_rate_hca", 128)))
        ratios = d.pop("compress_ratios", None)
        if d.get("layer_types"):
            kw["layer_types"] = list(d.pop("layer_types"))[:n]
        elif ratios is not None:
            kw["layer_types"] = [_ratio_to_type(r, kw) for r in ratios[:n]]
        if ratios is not None and len(ratios) > n:
            kw["mtp_layer_types"] = [_ratio_to_type(r, kw) for r in ratios[n : n + n_mtp]]
        if d.get("mlp_layer_types"):
            kw["mlp_layer_types"] = list(d.pop("mlp_layer_types"))[:n]
        elif "num_hash_layers" in d:
            h = int(d.pop("num_hash_layers"))
            kw["mlp_layer_types"] = [HASH_MOE] * min(h, n) + [MOE] * max(0, n - h)
        # partial rope: official qk_rope_head_dim, or transformers' partial_rotary_factor
        head_dim = int(d.get("head_dim", cls.head_dim))
        if "qk_rope_head_dim" not in d and d.get("partial_rotary_factor"):
            kw["qk_rope_head_dim"] = int(round(head_dim * float(d["partial_rotary_factor"])))
        # rope: official rope_scaling, or transformers' nested rope_parameters {main, compress}
        rp = d.pop("rope_parameters", None)
        if isinstance(rp, dict) and isinstance(rp.get("compress"), dict):
            comp = rp["compress"]
            kw["rope_theta"] = float(rp.get("main", {}).get("rope_theta", d.get("rope_theta", 10000.0)))
            kw["compress_rope_theta"] = float(comp.get("rope_theta", d.get("compress_rope_theta", 160000.0)))
            if "rope_scaling" not in d:
                rtype = comp.get("rope_type", comp.get("type", "default"))
                kw["rope_scaling"] = (
                    None
                    if rtype == "default"
                    else {
                        "type": rtype,
                        **{
                            k: comp[k]
                            for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
                            if k in comp
                        },
                    }
                )
        if "rope_scaling" in d:
            rs = d.pop("rope_scaling")
            kw["rope_scaling"] = None if not rs else {k: v for k, v in rs.items() if k != "rope_type"} | {
                "type": rs.get("type", rs.get("rope_type"))
            }
        extra = {}
        for k, v in d.items():
            if k in known and k not in ("extra",):
                kw.setdefault(k, v)
            elif k not in _IGNORED_KEYS:
                extra[k] = v
        kw["extra"] = extra
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        return cls(**kw)

    def to_dict(self) -> dict:
        """The config.json contents: official keys plus transformers' keys (see module doc)."""
        rates = {CSA: self.csa_compress_rate, HCA: self.hca_compress_rate}
        ratios = [self.compress_rate(t) for t in self.layer_types + self.mtp_layer_types]
        d = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": 1,
            "head_dim": self.head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "partial_rotary_factor": self.qk_rope_head_dim / self.head_dim,
            "q_lora_rank": self.q_lora_rank,
            "o_groups": self.o_groups,
            "o_lora_rank": self.o_lora_rank,
            "sliding_window": self.sliding_window,
            "compress_ratios": ratios,
            "layer_types": list(self.layer_types),
            "compress_rates": rates,
            "rope_theta": self.rope_theta,
            "compress_rope_theta": self.compress_rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "index_n_heads": self.index_n_heads,
            "index_head_dim": self.index_head_dim,
            "index_topk": self.index_topk,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "moe_intermediate_size": self.moe_intermediate_size,
            "routed_scaling_factor": self.routed_scaling_factor,
            "scoring_func": self.scoring_func,
            "norm_topk_prob": self.norm_topk_prob,
            "topk_method": "noaux_tc",
            "swiglu_limit": self.swiglu_limit,
            "num_hash_layers": self.num_hash_layers,
            "mlp_layer_types": list(self.mlp_layer_types),
            "hc_mult": self.hc_mult,
            "hc_sinkhorn_iters": self.hc_sinkhorn_iters,
            "hc_eps": self.hc_eps,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.initializer_range,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "hidden_act": "silu",
        }
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        data = read_json(path)  # ValueError naming the file: not JSON, nested too deeply, too large
        if data.get("model_type") not in (None, "deepseek_v4"):
            raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not a DeepSeek-V4 config")
        return cls.from_dict(data)

    def save_json(self, path: str | os.PathLike) -> None:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    # -------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Keys we write or that transformers writes but that have no field (derived or fixed by V4).
_IGNORED_KEYS = {
    "architectures", "model_type", "num_key_value_heads", "partial_rotary_factor", "topk_method",
    "tie_word_embeddings", "attention_bias", "attention_dropout", "hidden_act", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "num_hash_layers", "compress_rate_csa", "compress_rate_hca",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "mlp_bias",
}


def _ratio_to_type(r: int, kw: dict) -> str:
    """Official compress_ratios entry -> layer type. The official code makes ratio 4 the
    overlapping CSA (with indexer) and any other nonzero ratio HCA; we follow it, and also
    adopt the ratios found as the config's CSA/HCA rates."""
    r = int(r)
    if r == 0:
        return SLIDING
    if r == kw.get("csa_compress_rate", 4):
        return CSA
    kw["hca_compress_rate"] = r
    return HCA


def _schedule(spec: str) -> list[str]:
    return [{"S": SLIDING, "C": CSA, "H": HCA}[c] for c in spec]


# name -> ModelConfig keyword arguments. Every preset has the same structure; `tiny` is the
# debug-size config used by the tests (torchtitan style), `small` is the benchmark config.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=1024, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=32, sliding_window=16,
        layer_types=_schedule("SCHC"), csa_compress_rate=4, hca_compress_rate=8,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 128,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=512, index_n_heads=2, index_head_dim=32, index_topk=8,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, routed_scaling_factor=1.5,
        mlp_layer_types=[HASH_MOE] + [MOE] * 3, num_nextn_predict_layers=1,
    ),
    "small": dict(
        vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=256, o_groups=4, o_lora_rank=128, sliding_window=128,
        layer_types=_schedule("SCHCHCHC"), csa_compress_rate=4, hca_compress_rate=16,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=65536, index_n_heads=4, index_head_dim=64, index_topk=32,
        n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256, routed_scaling_factor=1.5,
        mlp_layer_types=[HASH_MOE] + [MOE] * 7, num_nextn_predict_layers=1,
    ),
    # The released models (spec section 0; ../shared/reference/*.config.json).
    "flash": dict(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        layer_types=_schedule("SS" + "CH" * 20 + "C"), csa_compress_rate=4, hca_compress_rate=128,
        index_n_heads=64, index_head_dim=128, index_topk=512, n_routed_experts=256, num_experts_per_tok=6,
        moe_intermediate_size=2048, routed_scaling_factor=1.5, mlp_layer_types=[HASH_MOE] * 3 + [MOE] * 40,
    ),
    "pro": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1536, o_groups=16, o_lora_rank=1024, sliding_window=128,
        layer_types=_schedule("HH" + "CH" * 29 + "C"), csa_compress_rate=4, hca_compress_rate=128,
        index_n_heads=64, index_head_dim=128, index_topk=1024, n_routed_experts=384, num_experts_per_tok=6,
        moe_intermediate_size=3072, routed_scaling_factor=2.5, mlp_layer_types=[HASH_MOE] * 3 + [MOE] * 58,
    ),
}
