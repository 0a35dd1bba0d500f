"""load_model() on local model folders (tiny models saved to tmp_path; nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_gpt2

from attentionpack import UnsupportedModelError, load_model


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "apcache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2")


def test_load_model_folder(isolated, tiny_model):
    model = tiny_model("qwen3")
    folder = isolated / "qwen3"
    model.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    loaded, tokenizer = load_model(folder)
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_model_folder_bfloat16(isolated, tiny_model):
    folder = isolated / "llama"
    tiny_model("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    loaded, _ = load_model(folder, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16


def test_load_model_unsupported_folder(isolated):
    folder = isolated / "gpt2"
    build_gpt2().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(folder)


def test_load_model_folder_with_one_corrupt_gguf(isolated):
    folder = isolated / "ggufdir"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="GGUF"):
        load_model(folder)


def test_load_model_folder_with_two_ggufs(isolated):
    folder = isolated / "two"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"")
    (folder / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder)
