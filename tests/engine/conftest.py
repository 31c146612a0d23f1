import pytest
import torch

from tests.engine.fixtures import make_model, make_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps are tiny: one intra-op thread is several times faster than two on a busy
    2-core machine (thread hand-off dominates). Restored after the module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def model():
    return make_model(0)


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()
