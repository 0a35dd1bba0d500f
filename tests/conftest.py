from __future__ import annotations

import functools
import os
import random

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_triton_decode.py). Triton reads this when
# it is first imported (transformers imports it with its attention modules), so it is set before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tiny_models  # noqa: E402

# The tiny models' matmuls are far too small to gain from intra-op threads; one thread avoids oversubscription
# (and large slowdowns) when the 2 cores are shared with other work.
torch.set_num_threads(1)


def pytest_configure(config):
    # emitted by torch itself when transformers imports it; not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@functools.cache
def _tiny(name: str):
    return tiny_models.build_model(name)


@pytest.fixture(scope="session")
def tiny_model():
    """tiny_model(name) -> a cached tiny random model (eval mode; never modified by the tests)."""
    return _tiny


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A fresh user cache folder ($ATTENTIONPACK_CACHE) for this test: retrieval-head files and the like."""
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded once per session."""
    from attentionpack import load_model

    model, tokenizer = load_model()
    return model, tokenizer
