from pathlib import Path

import pytest
import torch

from cptlab.config import ModelConfig
from cptlab.models import build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return build_tiny_model(cfg, tokenizer, seed=0).eval()


@pytest.fixture(autouse=True)
def builtin_domains_only():
    """A config with a `domains` section installs its domains process-wide; each test starts and ends
    with the built-in ones only."""
    from cptlab.tasks import install_domains

    install_domains({})
    yield
    install_domains({})


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module's whole runs: tiny matmuls on a busy two-core machine run
    faster and give the same bits at any machine's thread count (see test_reliability.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warmup_cache(tmp_path_factory) -> Path:
    """A warm-up cache directory shared by a test module's runs (the base is built once)."""
    return tmp_path_factory.mktemp("warmup-cache")
