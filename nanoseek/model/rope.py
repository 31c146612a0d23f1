"""Rotary position embedding for DeepSeek-V4: interleaved, partial, with YaRN on compressed layers.

Spec 1.3 item 3. RoPE rotates consecutive channel pairs (2i, 2i+1) of the *last*
`qk_rope_head_dim` channels of a head, like multiplying complex numbers. Two frequency tables
exist: sliding-window layers (and MTP) use plain RoPE with `rope_theta`; CSA/HCA layers use
`compress_rope_theta` with YaRN frequency interpolation, f' = f/s*(1-r) + f*r, where the ramp r
goes from 1 (high frequencies, kept) to 0 (low frequencies, interpolated) between the
correction dims of beta_fast and beta_slow. No YaRN magnitude scaling is applied to cos/sin
(the official inference code does not apply it either).

Positions are explicit tensors, so the same code serves training (0..S-1), chunked prefill and
batched decode with a different position per row. The inverse rotation (rotate by -t) is used on
the attention output so each value's contribution depends only on relative distance.
"""

from __future__ import annotations

import math

import torch


def inv_frequencies(rope_dim: int, theta: float, yarn: dict | None = None) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim // 2] in fp32, with YaRN interpolation if given."""
    freqs = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
    if yarn:
        factor = float(yarn["factor"])
        original = float(yarn["original_max_position_embeddings"])
        beta_fast, beta_slow = float(yarn.get("beta_fast", 32)), float(yarn.get("beta_slow", 1))

        def correction_dim(rotations: float) -> float:
            # the pair index whose wavelength completes `rotations` turns over the original context
            return rope_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 -> keep the original (extrapolated) frequency
        freqs = freqs / factor * (1 - keep) + freqs * keep
    return freqs


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [*positions.shape, rope_dim // 2] in fp32."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing 2*cos.shape[-1] channels of x (interleaved pairs); the rest pass through.

    x: [..., S, (H,) D]; cos/sin: [..., S, rope_dim/2] broadcastable after inserting head dims.
    The rotation runs in fp32 and the result is cast back to x's dtype.
    """
    rd = cos.shape[-1] * 2
    while cos.dim() < x.dim():  # insert head dims between S and D
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    nope, rope = x[..., :-rd], x[..., -rd:]
    if use_complex and x.device.type in ("cpu", "cuda") and not torch.compiler.is_compiling():
        rotated = _rotate_complex(rope.float(), cos, sin).to(x.dtype)
    else:
        pairs = rope.float().unflatten(-1, (-1, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((nope, rotated), dim=-1) if nope.shape[-1] else rotated


# The pair rotation as one complex product (a + ib)(cos + i sin): the same two products and sums
# per pair, bit for bit, in one kernel instead of six, and one autograd node (its backward is
# the product with the conjugate) instead of nine; about 0.55-0.65x the time of the real-valued
# formula, forward + backward, at the speedrun model's shapes. Eager only: under torch.compile
# the real-valued formula below is what Inductor fuses. False: the real-valued formula always.
use_complex = True


def _rotate_complex(rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = rope.unflatten(-1, (-1, 2))
    # view_as_complex needs unit stride within a pair and even strides/offset elsewhere
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(s % 2 for s in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_real(torch.view_as_complex(pairs) * torch.complex(cos, sin)).flatten(-2)
