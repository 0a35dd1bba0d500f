"""Invalid configuration, unsupported models and unreadable model files fail early with clear errors."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
import torch
from tiny_models import build_gpt2

from attentionpack import PRESETS, SUPPORTED_MODEL_TYPES, PackConfig, PackedCache, UnsupportedModelError, load_model

# field -> invalid values. Every field of PackConfig must appear here (checked below).
_RANK_BAD = [0, -1, 2.5, "4", True]
_FRACTION_BAD = [0, 0.0, -0.2, 1.5, float("nan"), "0.5", True]
_BAD_VALUES = {
    "key_codec": ["zstd", None, 1, "EXACT"],
    "value_codec": ["zstd", None, 1, "lowrank "],
    "key_rank": _RANK_BAD,
    "value_rank": _RANK_BAD,
    "key_rank_fraction": _FRACTION_BAD,
    "value_rank_fraction": _FRACTION_BAD,
    "key_energy": _FRACTION_BAD,
    "value_energy": _FRACTION_BAD,
    "key_max_rank_fraction": _FRACTION_BAD + [None],
    "value_max_rank_fraction": _FRACTION_BAD + [None],
    # with the default codec "lowrank", bits quantize the factors: None, 4 or 8 (an int)
    "key_bits": [3, 2, 16, -4, 0, "8", True, 8.0],
    "value_bits": [3, 2, 16, -4, 0, "4", False, 4.0],
    "quant_group": [0, 7, -1, 8.5, "32", True, None],
    "key_group": [0, 7, -1, 8.5, "32", True],  # None is the default (quant_group)
    "value_group": [4, 16.0, "64", False],
    "sink": [-1, 2.0, "4", None, True],
    "window": [-1, 8.0, "8", None, False],
    "tail_dtype": ["float32", "fp16", "bfloat16", 16, True, torch.float16],
    "chunk": [0, -3, 16.0, True, "64"],  # None is the default (64 with a budget, 256 without)
    "min_span": [0, -3, 4.5, None, True],
    "compress_sliding_layers": [1, 0, "yes", None],
    "fallback_exact": [1, 0, "no", None],
    "key_pre_rope": [1, 0, "yes", None],
    "key_objective": ["energy", "", None, 1],
    "compressed_attention": [1, 0, "no", None],
    "image_basis": ["per-image", "SHARED", None, 1],
    "video_group_frames": [0, -2, 2.0, "4", None, True],
    "budget": [0, 0.0, -0.5, 1.5, True, "0.125", float("inf")],
    "budget_strict": [None, 1, "no"],
    "retrieval_heads": [-0.1, 1.5, True, "0.15", float("nan")],
    "keep": [0, 0.0, -0.5, 1.5, True, "0.5"],
    "evicted_bits": [3, 8, True, 2.0, "2"],
    "observation": [0, -1, 2.5, None, True],
    "layer_weights": [None, 1, "yes", 0.5],
    # per-modality overrides: a dict of codec fields whose result is a valid configuration
    "text": [{"key_bits": 3}, {"sink": 2}, {"key_codec": "zstd"}, ["key_bits", 8], "exact"],
    "image": [{"value_codec": "quant"}, {"key_rank": 0}, {"window": 4}, 0.9, ("key_energy", 0.9)],
    "video": [{"key_energy": 1.5}, {"value_bits": 16}, {"image_basis": "shared"}, True],
}
_UNVALIDATED = {"name"}  # a free-form label


def test_every_field_is_covered():
    fields = {f.name for f in dataclasses.fields(PackConfig)}
    assert fields == set(_BAD_VALUES) | _UNVALIDATED


@pytest.mark.parametrize(
    "field,value",
    [(f, v) for f, values in _BAD_VALUES.items() for v in values],
    ids=[f"{f}={v!r}" for f, values in _BAD_VALUES.items() for v in values],
)
def test_invalid_field_raises_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        PackConfig(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message
    # replace() validates again (on the defaults: whether some values are valid depends on the codec, e.g.
    # 2 bits are fine for "quant" but not for "lowrank", and the presets' codecs are tuning choices)
    with pytest.raises(ValueError, match=field):
        PackConfig().replace(**{field: value})


@pytest.mark.parametrize("prefix", ["key", "value"])
def test_lowrank_codec_needs_a_rank_rule(prefix):
    with pytest.raises(ValueError, match=f"{prefix}_energy"):
        PackConfig(**{f"{prefix}_energy": None})
    # any one rank rule is enough; with the exact codec none is needed
    PackConfig(**{f"{prefix}_energy": None, f"{prefix}_rank": 3})
    PackConfig(**{f"{prefix}_energy": None, f"{prefix}_rank_fraction": 0.5})
    PackConfig(**{f"{prefix}_energy": None, f"{prefix}_codec": "exact"})


@pytest.mark.parametrize("prefix", ["key", "value"])
@pytest.mark.parametrize("bits", [None, 1, 3, 16, True, 4.0, "4"])
def test_quant_codec_bits_must_be_2_4_or_8(prefix, bits):
    with pytest.raises(ValueError) as info:
        PackConfig(**{f"{prefix}_codec": "quant", f"{prefix}_bits": bits})
    assert f"{prefix}_bits" in str(info.value) and repr(bits) in str(info.value)


@pytest.mark.parametrize("prefix", ["key", "value"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exact_codec_takes_no_bits(prefix, bits):
    with pytest.raises(ValueError, match=f"{prefix}_bits"):
        PackConfig(**{f"{prefix}_codec": "exact", f"{prefix}_energy": None, f"{prefix}_bits": bits})


def test_valid_bits_are_accepted():
    for bits in (2, 4, 8):
        PackConfig(key_codec="quant", key_bits=bits, value_codec="quant", value_bits=bits, quant_group=8)
    for bits in (None, 4, 8):
        PackConfig(key_bits=bits, value_bits=bits)


def test_valid_boundary_values_are_accepted():
    PackConfig(
        sink=0,
        window=0,
        chunk=1,
        min_span=1,
        key_energy=1.0,
        value_rank_fraction=1.0,
        key_max_rank_fraction=1.0,
        key_rank=1,
    )
    PackConfig(key_rank_fraction=1, value_energy=1)  # ints are numbers too


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PackConfig().sink = 3


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as info:
        PackConfig.preset("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ("lossless", "balanced", "max"):
        assert name in message


def test_presets_are_valid_and_named():
    assert set(PRESETS) == {"lossless", "balanced", "max", "razor"}
    for name in PRESETS:
        cfg = PackConfig.preset(name)
        assert cfg.name == name
    assert PackConfig.preset("lossless").is_lossless
    assert not PackConfig.preset("max").is_lossless


def test_replace_unknown_field_raises():
    with pytest.raises(ValueError, match="bogus"):
        PackConfig().replace(bogus=1)
    assert PackConfig().replace(sink=2).sink == 2


def test_unsupported_model_raises_listing_supported_types():
    model = build_gpt2()
    with pytest.raises(UnsupportedModelError) as info:
        PackedCache(model, "lossless")
    message = str(info.value)
    assert "gpt2" in message
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in message
    assert isinstance(info.value, ValueError)


def test_object_without_config_is_unsupported():
    with pytest.raises(UnsupportedModelError):
        PackedCache(torch.nn.Linear(2, 2), "lossless")


@pytest.mark.parametrize("bad", [42, 0.5, {"sink": 4}, ["lossless"], b"max"])
def test_config_of_wrong_type_raises_type_error(tiny_model, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        PackedCache(tiny_model("llama"), bad)


def test_unknown_preset_name_in_cache_raises(tiny_model):
    with pytest.raises(ValueError, match="nope"):
        PackedCache(tiny_model("llama"), "nope")


@pytest.mark.parametrize("bounds", [(0,), (-5, 10), (10, -1)])
def test_bad_span_boundaries_raise(tiny_model, bounds):
    with pytest.raises(ValueError, match="span_boundaries"):
        PackedCache(tiny_model("llama"), "max", span_boundaries=bounds)


def test_default_config_is_balanced(tiny_model):
    assert PackedCache(tiny_model("llama")).config == PackConfig.preset("balanced")


# ---- load_model ------------------------------------------------------------------------------------------------


@pytest.fixture
def isolated_cache_dir(tmp_path, monkeypatch):
    """Conversions of test files must not land in (or be read from) the user's cache."""
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "apcache"))
    return tmp_path


def test_load_model_missing_path(isolated_cache_dir):
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        load_model("/nonexistent")


def test_load_model_non_gguf_file(isolated_cache_dir):
    path = isolated_cache_dir / "weights.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="gguf"):
        load_model(path)


def test_load_model_folder_without_config(isolated_cache_dir):
    folder = isolated_cache_dir / "empty"
    folder.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder)


@pytest.mark.parametrize("dtype", [torch.int8, "float32", None])
def test_load_model_bad_dtype(isolated_cache_dir, dtype):
    with pytest.raises(ValueError, match="dtype"):
        load_model("/nonexistent", dtype=dtype)


def _assert_clear_gguf_error(path):
    with pytest.raises(ValueError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "GGUF" in message


def test_load_model_random_bytes_gguf(isolated_cache_dir):
    path = isolated_cache_dir / "x.gguf"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    _assert_clear_gguf_error(path)


def test_load_model_gguf_with_bad_version(isolated_cache_dir):
    path = isolated_cache_dir / "v.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 99) + os.urandom(64))
    _assert_clear_gguf_error(path)


@pytest.mark.parametrize("kv_count", [1, 5])
def test_load_model_truncated_gguf(isolated_cache_dir, kv_count):
    """A GGUF file cut short right after a valid header (e.g. an interrupted download)."""
    path = isolated_cache_dir / "truncated.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, kv_count))
    _assert_clear_gguf_error(path)


def test_load_model_empty_gguf(isolated_cache_dir):
    path = isolated_cache_dir / "empty.gguf"
    path.write_bytes(b"")
    _assert_clear_gguf_error(path)
