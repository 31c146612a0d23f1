"""The DeepSeek-V4 model, one file per concern (see each module's docstring):

rope.py (partial interleaved RoPE + YaRN), norm.py, hyper_connections.py (mHC),
compressor.py (CSA/HCA pooling), indexer.py (lightning indexer), attention.py, moe.py,
cache.py (decode state), context.py (per-call state), transformer.py (the model, MTP, losses),
info.py (`nanoseek info`).
"""

from .cache import DecodeCache
from .transformer import LossTerms, Transformer, count_parameters

__all__ = ["Transformer", "LossTerms", "DecodeCache", "count_parameters"]
