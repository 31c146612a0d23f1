"""nanoseek: an open, hackable, full-stack PyTorch implementation of the DeepSeek-V4 code-model system.

    from nanoseek import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_preset("tiny"))
"""

from .config import PRESETS, ModelConfig
from .model import DecodeCache, LossTerms, Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "LossTerms", "DecodeCache"]
__version__ = "0.1.0"
