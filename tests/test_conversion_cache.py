"""GGUF conversions are cached by content: a touched or copied file finds its conversion again, and a changed file
replaces the old conversion instead of adding a second copy (2 x 517 MB before)."""

from __future__ import annotations

import os

import torch

from attentionpack.models import loading


def _gguf(path, payload: bytes):
    path.write_bytes(b"GGUF" + payload)
    return path


def test_key_follows_content_not_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "cache"))
    f = _gguf(tmp_path / "m.gguf", os.urandom(3 << 20))
    first = loading.converted_cache_dir(f, torch.float32)
    os.utime(f, (1_000_000_000, 1_000_000_000))  # touched: same content
    assert loading.converted_cache_dir(f, torch.float32) == first
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    (copy / "m.gguf").write_bytes(f.read_bytes())
    assert loading.converted_cache_dir(copy / "m.gguf", torch.float32) == first  # a copy: same conversion
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # the tail changed (same size)
    f.write_bytes(bytes(data))
    assert loading.converted_cache_dir(f, torch.float32) != first
    assert loading.converted_cache_dir(f, torch.bfloat16) != loading.converted_cache_dir(f, torch.float32)


class _Saveable:
    def __init__(self, name):
        self.name, self.config, self.hf_quantizer = name, type("C", (), {})(), None

    def save_pretrained(self, folder):
        (folder / f"{self.name}.txt").write_text(self.name)


def test_a_new_conversion_removes_the_stale_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "cache"))
    f = _gguf(tmp_path / "m.gguf", os.urandom(1 << 16))
    other = _gguf(tmp_path / "other.gguf", os.urandom(1 << 16))
    old = loading.converted_cache_dir(f, torch.float32)
    loading._save_converted(_Saveable("model"), _Saveable("tok"), old)
    keep = [loading.converted_cache_dir(other, torch.float32), loading.converted_cache_dir(f, torch.bfloat16)]
    for folder in keep:
        loading._save_converted(_Saveable("model"), _Saveable("tok"), folder)
    f.write_bytes(b"GGUF" + os.urandom(1 << 16))  # a new version of the same file
    new = loading.converted_cache_dir(f, torch.float32)
    assert new != old
    loading._save_converted(_Saveable("model"), _Saveable("tok"), new)
    assert new.is_dir() and not old.exists()
    assert all(folder.is_dir() for folder in keep)  # other files and other dtypes are left alone
    assert sorted(p.name for p in new.parent.iterdir()) == sorted([new.name, *(k.name for k in keep)])
