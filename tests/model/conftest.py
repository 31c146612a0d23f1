import pytest
import torch

from nanoseek import ModelConfig, Transformer


def perturbed(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised ones (sinks, position biases, mHC biases)
    take part in the comparison too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def tiny_config():
    return ModelConfig.from_preset("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return perturbed(Transformer(tiny_config)).eval()
