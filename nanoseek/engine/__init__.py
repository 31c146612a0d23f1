"""Inference engine: sampling, batched/streaming generation, fill-in-the-middle, continuous batching.

    from nanoseek.engine import generate, generate_stream, fill_in_middle, Engine, SamplingParams

See generate.py (the Python API), batch.py (slots, chunked prefill, stops), scheduler.py (the
background engine the server uses), speculative.py (MTP speculative decoding) and docs/engine.md.
"""

from .batch import BatchRunner, Delta, Sequence
from .generate import (Completion, StreamEvent, fill_in_middle, fim_prompt, generate, generate_full,
                       generate_stream)
from .sampling import SamplingParams
from .scheduler import Engine, EngineError, RequestStream
from .speculative import SpecStats, speculative_generate

__all__ = ["generate", "generate_full", "generate_stream", "fill_in_middle", "fim_prompt", "Completion",
           "StreamEvent", "SamplingParams", "Engine", "EngineError", "RequestStream", "BatchRunner", "Sequence",
           "Delta", "speculative_generate", "SpecStats"]
