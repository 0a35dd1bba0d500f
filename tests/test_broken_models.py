"""Broken model folders and files: `attentionpack generate --model X` answers with at most 3 lines that name the
problem and the fix, and exit code 2 (no traceback); `load_model` raises the same message as a ValueError."""

from __future__ import annotations

import shutil

import pytest
from tiny_models import VOCAB
from typer.testing import CliRunner

from attentionpack import load_model
from attentionpack.cli import app
from attentionpack.models.checks import ModelFolderError


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2")


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("good") / "llama"
    tiny_model("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "apcache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "prompt.txt").write_text("t3 t4 t5 t6")
    return tmp_path


def _copy(good, tmp_path, name: str):
    folder = tmp_path / name
    shutil.copytree(good, folder)
    return folder


def _break_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')  # cut short


def _no_weights(folder):
    (folder / "model.safetensors").unlink()


def _truncated_weights(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _only_config(folder):
    for path in folder.iterdir():
        if path.name != "config.json":
            path.unlink()


def _no_tokenizer(folder):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


CASES = {  # how a good folder is broken -> words the error must contain (the problem and the fix)
    "invalid config.json": (_break_config, ["config.json", "not valid JSON", "restore"]),
    "no weights": (_no_weights, ["no weights", "copy the model's weight files"]),
    "truncated safetensors": (_truncated_weights, ["model.safetensors", "truncated", "copy or download"]),
    "only config.json": (_only_config, ["no weights", "copy"]),
    "no tokenizer": (_no_tokenizer, ["no tokenizer files", "copy the model's tokenizer files"]),
}


def _assert_short_error(result, words):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert 1 <= len(lines) <= 3, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    for blamed in ("sentencepiece", "tiktoken"):
        assert blamed not in result.output


@pytest.mark.parametrize("case", list(CASES))
def test_broken_folder_cli_error(case, good, isolated):
    breaker, words = CASES[case]
    folder = _copy(good, isolated, case.replace(" ", "_"))
    breaker(folder)
    result = CliRunner().invoke(
        app, ["generate", "-f", str(isolated / "prompt.txt"), "-n", "2", "--model", str(folder)]
    )
    _assert_short_error(result, words)
    with pytest.raises(ModelFolderError):
        load_model(folder)


@pytest.fixture(scope="module")
def truncated_gguf(tmp_path_factory):
    """The embedded model's GGUF cut after 8 MB (a valid header, then too few tensor bytes): an interrupted
    download."""
    from attentionpack.models.loading import embedded_model_file

    path = tmp_path_factory.mktemp("gguf") / "cut.gguf"
    with embedded_model_file().open("rb") as f:
        path.write_bytes(f.read(8_000_000))
    return path


def test_truncated_gguf_cli_error(truncated_gguf, isolated):
    result = CliRunner().invoke(
        app, ["generate", "-f", str(isolated / "prompt.txt"), "-n", "2", "--model", str(truncated_gguf)]
    )
    _assert_short_error(result, [str(truncated_gguf), "truncated", "download the complete file again"])
    assert "reshape" not in result.output


def test_good_folder_still_loads(good, isolated):
    model, tokenizer = load_model(good)
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None
