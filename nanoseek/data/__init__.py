"""The code-data pipeline: sources -> clean corpus -> tokenizer -> token shards -> packed batches.

    nanoseek data build --out runs/corpus                  # build.py   (sources, clean, dedup, licenses)
    nanoseek tokenizer train --corpus runs/corpus --out runs/tokenizer   # tokenizer.py
    nanoseek data tokenize --corpus runs/corpus --tokenizer runs/tokenizer --out runs/shards   # shards.py

Each stage is also a function (`build_corpus`, `train_tokenizer`, `tokenize_corpus`) that
detects finished output and reuses it; `TokenLoader` feeds the trainer and `load_tokenizer`
serves everyone else. Names are imported lazily so `import nanoseek.data` stays cheap.
See docs/data.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_corpus": "nanoseek.data.build",
    "load_manifest": "nanoseek.data.build",
    "iter_documents": "nanoseek.data.build",
    "train_tokenizer": "nanoseek.data.tokenizer",
    "load_tokenizer": "nanoseek.data.tokenizer",
    "Tokenizer": "nanoseek.data.tokenizer",
    "tokenize_corpus": "nanoseek.data.shards",
    "TokenLoader": "nanoseek.data.shards",
    "ShardSet": "nanoseek.data.shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nanoseek.data' has no attribute {name!r}")
