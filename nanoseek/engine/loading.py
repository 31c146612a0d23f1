"""A checkpoint directory -> (Transformer in eval mode, Tokenizer): the one loader every caller uses.

    from nanoseek.engine import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("runs/ckpt")                       # tokenizer from the same dir
    model, tok = load_model_and_tokenizer("runs/ckpt", "runs/tok", dtype="bf16", threads=4, compile=True)

Checks, each a clear error before anything large is loaded: the model directory has a config.json
(written by save_pretrained), the tokenizer directory has a tokenizer.json, and, after loading, the
tokenizer's vocabulary fits the model's embedding table (config.vocab_size).
"""

from __future__ import annotations

import os
from pathlib import Path

from .._argparse import int_at_least
from .compiling import compile_for_decoding

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype):
    """None | torch.dtype | a name in DTYPES ("bf16", "float32", ...) -> torch.dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}")
    return getattr(torch, DTYPES[dtype])


def load_model_and_tokenizer(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                             dtype=None, threads: int | None = None, compile: bool | None = None):
    """(Transformer in eval mode, Tokenizer) from a checkpoint directory; clear errors if absent.
    dtype: None (as saved), a torch.dtype or a name ("bf16", "float32", ...).
    compile: torch.compile the decode step (Transformer.compile_blocks; compiles on first use);
    None = auto (on where a compiler toolchain exists: engine/compiling.py), False = eager."""
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..model import Transformer

    if threads:
        torch.set_num_threads(int(threads))
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json; pass a directory written by save_pretrained")
    tdir = Path(tokenizer_dir) if tokenizer_dir else d
    if not (tdir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tdir}; pass --tokenizer DIR")
    model = Transformer.from_pretrained(d, dtype=resolve_dtype(dtype)).eval()
    tok = load_tokenizer(tdir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    compile_for_decoding(model, compile)
    return model, tok


def add_loading_args(p) -> None:
    """The loading flags shared by `generate`, `chat` and `serve` (each adds its own model
    argument): --tokenizer, --dtype, --threads and the decode-step compilation switches."""
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: as saved)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                   help="torch.compile the decode step even where auto would not (default: auto -- compiled "
                        "where a C++ compiler exists, cached on disk; see docs/engine.md)")
    p.add_argument("--enforce-eager", dest="compile", action="store_const", const=False,
                   help="never compile: eager decode steps (as vLLM's flag)")
