"""Inference engine: sampling, batched/streaming generation, fill-in-the-middle, continuous batching.

    from nanoseek.engine import generate, generate_stream, fill_in_middle, Engine, SamplingParams
    from nanoseek.engine import load_model_and_tokenizer   # (model, tokenizer) from a checkpoint dir

See generate.py (the Python API and the drivers: generate, generate_stream, speculative_generate),
batch.py (slots, chunked prefill, stops), engine.py (the background continuous-batching `Engine`
the server uses), speculative.py (one MTP speculative round), loading.py (checkpoint directory ->
model + tokenizer) and docs/engine.md.
"""

from .batch import BatchRunner, Delta, Sequence
from .engine import Engine, EngineError, RequestStream
from .generate import (Completion, StreamEvent, fill_in_middle, fim_prompt, generate, generate_full,
                       generate_stream, speculative_generate)
from .loading import load_model_and_tokenizer
from .sampling import SamplingParams
from .speculative import SpecStats

__all__ = ["generate", "generate_full", "generate_stream", "fill_in_middle", "fim_prompt", "Completion",
           "StreamEvent", "SamplingParams", "Engine", "EngineError", "RequestStream", "BatchRunner", "Sequence",
           "Delta", "speculative_generate", "SpecStats", "load_model_and_tokenizer"]
