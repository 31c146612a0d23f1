"""fp32 regions under autocast: `with fp32_region(x.device.type): ...`, `fp32_or_wider(t)` and `wide_dtype(t)`.

The parts of V4 that the reference runs in fp32 (mHC, the compressor's projections, the router,
the attention kernel) turn autocast off around themselves. When autocast is not on (inference,
fp32 training) that context does nothing -- except inside a compiled graph: dynamo records the
enter and exit as calls, and AOT autograd's on-disk cache refuses graphs holding them, so every
such graph was traced again by AOT autograd in each new process (about 6 of the ~11 s before a
warm process decodes its first `small` token). So the context is entered only when autocast is
on. Whether it is belongs to dynamo's global-state guard: a graph traced without autocast is
never reused under it.
"""

from __future__ import annotations

import contextlib

import torch


def fp32_region(device_type: str):
    """`torch.autocast(device_type, enabled=False)` when autocast is on there, else a no-op."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """What the fp32 parts compute in: bf16/fp16 widened to fp32, while a float64 model (the tests'
    exact reference) stays float64."""
    return t.to(wide_dtype(t))   # (no copy when t is fp32 / fp64 already)


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32_or_wider(t).dtype, without converting t (a streams-sized bf16 tensor is 16 MiB)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
