"""Shared fixtures: the byte-level tokenizer and a factory of small tiny models.

Run the suite with `python -m pytest -q` from the repository root.
"""

import pytest
import torch
from hypothesis import settings

import tiny_model

# No deadline: timings on a shared 2-core machine vary too much for hypothesis' 200 ms default.
settings.register_profile("repo", deadline=None)
settings.load_profile("repo")

# Small enough to run a forward + backward in milliseconds on one CPU core.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=128)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_model.make_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """make_model(seed=0, **overrides) -> a freshly initialised TinyDLM (SMALL unless overridden)."""
    def build(seed=0, **overrides):
        torch.manual_seed(seed)
        return tiny_model.make_tiny_model(tokenizer, **{**SMALL, **overrides})
    return build


@pytest.fixture(autouse=True)
def _few_threads():
    """The test machine shares 2 cores; tiny matmuls gain nothing from more threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
