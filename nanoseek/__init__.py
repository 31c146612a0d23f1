"""nanoseek: an open, hackable, full-stack PyTorch implementation of the DeepSeek-V4 code-model system.

    from nanoseek import ModelConfig, Transformer, generate
    model = Transformer(ModelConfig.from_preset("tiny"))

The public names are imported lazily (PEP 562), so `import nanoseek.data...` in a tokenizer
worker process does not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "nanoseek.config",
    "PRESETS": "nanoseek.config",
    "Transformer": "nanoseek.model",
    "LossTerms": "nanoseek.model",
    "DecodeCache": "nanoseek.model",
    "generate": "nanoseek.engine.generate",
    "generate_stream": "nanoseek.engine.generate",
    "load_tokenizer": "nanoseek.data.tokenizer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
