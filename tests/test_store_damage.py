"""Never a wrong answer: damaged or mismatched saved caches are refused with a `CacheFileError` naming the reason.

`test_generated_corruptions_are_all_refused` builds well over 500 damaged variants of one saved cache — bit flips
at random offsets of both files, truncations and extensions, edited manifest fields (with the manifest checksum
left stale and with it recomputed), files swapped between saves, missing files — plus loads with another model,
PackConfig and tokenizer, and checks that every one raises CacheFileError (no other exception) and that no cache
is returned; for damaged bytes no PackedCache is even constructed.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from store_helpers import prefill
from tiny_models import build_model

from attentionpack import PackConfig, PackedCache
from attentionpack.cache.file_checks import MANIFEST, TENSORS, tensor_checksums
from attentionpack.cache.tree import _sha, canonical_json
from attentionpack.store import CacheFileError, load_cache

ALL_REASONS = {"missing", "format", "damaged", "truncated", "model", "tokenizer", "config", "tokens", "malformed"}
CONFIG = PackConfig(key_rank=6, value_codec="quant", value_bits=4, key_bits=4, chunk=16, window=16)


class FakeTokenizer:
    """Just what a tokenizer fingerprint reads."""

    def __init__(self, shift: int = 0):
        self.vocab = {f"t{i}": (i + shift) % 128 for i in range(128)}
        self.chat_template = None
        self.all_special_tokens = ["t0"]
        self.added_tokens_decoder = {}
        self.bos_token_id, self.eos_token_id = 1, 2

    def get_vocab(self):
        return dict(self.vocab)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build_model("llama")
    cache, ids, _, _ = prefill(model, CONFIG, prompt=200, decode=20)
    root = tmp_path_factory.mktemp("damage")
    tok = FakeTokenizer()
    cache.save(root / "orig", tokens=ids, tokenizer=tok)
    other, ids2, _, _ = prefill(model, CONFIG, prompt=200, seed=5, decode=20)
    other.save(root / "other", tokens=ids2, tokenizer=tok)
    assert load_cache(root / "orig", model, CONFIG, tok).cache.get_seq_length() == cache.get_seq_length()
    return model, tok, root


def _variant(root: Path, n: int, manifest: bytes, tensors: bytes | None) -> Path:
    path = root / f"v{n}"
    path.mkdir()
    (path / MANIFEST).write_bytes(manifest)
    if tensors is not None:
        (path / TENSORS).write_bytes(tensors)
    return path


def _flip(data: bytes, rng: random.Random, offset: int | None = None) -> bytes:
    b = bytearray(data)
    at = rng.randrange(len(b)) if offset is None else offset
    b[at] ^= 1 << rng.randrange(8)
    return bytes(b)


def _resealed(manifest: dict) -> bytes:
    """The manifest with its checksum recomputed (an edit a checksum cannot catch: semantic checks must)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return canonical_json({**body, "manifest_sha256": _sha(canonical_json(body))}) + b"\n"


def _edits(manifest: dict, rng: random.Random):
    """(label, edited manifest dict, expected reasons) for field edits."""

    def edit(fn):
        m = json.loads(json.dumps(manifest))
        fn(m)
        return m

    layer = rng.randrange(len(manifest["cache"]["layers"]))
    checks = tensor_checksums(manifest)
    some_tensor = rng.choice(sorted(checks))
    out = [
        ("format_version", edit(lambda m: m.update(format_version=2)), {"format"}),
        ("format", edit(lambda m: m.update(format="something.else")), {"format"}),
        ("architecture", edit(lambda m: m["model"].update(architecture="GPT2LMHeadModel/gpt2")), {"model"}),
        ("weights", edit(lambda m: m["model"].update(weights_sha256="0" * 64)), {"model"}),
        ("model_config", edit(lambda m: m["model"].update(config_sha256="1" * 64)), {"model"}),
        ("tokenizer", edit(lambda m: m["tokenizer"].update(sha256="2" * 64)), {"tokenizer"}),
        ("config_window", edit(lambda m: m["config"].update(window=32)), {"config"}),
        ("config_sha", edit(lambda m: m.update(config_sha256="3" * 64)), {"config"}),
        ("file_sha", edit(lambda m: m["file"].update(sha256="4" * 64)), {"damaged"}),
        ("file_bytes", edit(lambda m: m["file"].update(bytes=m["file"]["bytes"] - 1)), {"truncated"}),
        ("seq_length", edit(lambda m: m.update(seq_length=m["seq_length"] + 1)), {"tokens", "malformed"}),
        ("tokens_sha", edit(lambda m: m["tokens"].update(sha256="5" * 64)), {"tokens"}),
        ("layers_dropped", edit(lambda m: m["cache"]["layers"].pop()), {"malformed"}),
        ("layer_total", edit(lambda m: m["cache"]["layers"][layer].update(total=10**6)), {"malformed"}),
        ("tail_begin", edit(lambda m: m["cache"]["layers"][layer]["tail"].update(begin=-3)), {"malformed"}),
        ("tail_capacity", edit(lambda m: m["cache"]["layers"][layer]["tail"].update(capacity=1)), {"malformed"}),
        ("class_fields", edit(lambda m: m["classes"]["Segment"]["fields"].reverse()), {"malformed"}),
        (
            "class_unknown",
            edit(
                lambda m: (
                    m["classes"].update(Bogus={"module": "x", "fields": []})
                    or m["cache"]["layers"][layer]["segments"].append(["Bogus"])
                )
            ),
            {"malformed"},
        ),
        ("segment_dropped", edit(lambda m: m["cache"]["layers"][layer]["segments"].pop(0)), {"malformed"}),
        ("stride", edit(lambda m: m["strides"].update({some_tensor: [1, 1, 1, 1, 1, 1]})), {"malformed"}),
        ("tensor_renamed", edit(lambda m: _rename_leaf(m, layer)), {"malformed"}),
    ]
    return out


def _rename_leaf(m: dict, layer: int) -> None:
    seg = m["cache"]["layers"][layer]["segments"][0]
    seg[3] = ["ExactPart", "@no.such.tensor"]  # keys part now refers to a tensor the file does not hold


def test_generated_corruptions_are_all_refused(saved, monkeypatch):
    model, tok, root = saved
    manifest_bytes = (root / "orig" / MANIFEST).read_bytes()
    tensor_bytes = (root / "orig" / TENSORS).read_bytes()
    manifest = json.loads(manifest_bytes)
    other_tensors = (root / "other" / TENSORS).read_bytes()
    rng = random.Random(15)
    header = int.from_bytes(tensor_bytes[:8], "little") + 8
    cases: list[tuple[str, Path, set, bool]] = []  # label, folder, reasons allowed, bytes damaged

    def add(label, m, t, reasons, damaged=True):
        cases.append((label, _variant(root, len(cases), m, t), reasons, damaged))

    for _ in range(120):  # tensors file: anywhere
        add("flip tensors", manifest_bytes, _flip(tensor_bytes, rng), {"damaged"})
    for _ in range(60):  # tensors file: the safetensors header
        add("flip tensors header", manifest_bytes, _flip(tensor_bytes, rng, rng.randrange(header)), {"damaged"})
    for _ in range(200):  # manifest: anywhere
        add("flip manifest", _flip(manifest_bytes, rng), tensor_bytes, {"damaged", "format"})
    for _ in range(50):
        cut = rng.randrange(len(tensor_bytes))
        add("truncate tensors", manifest_bytes, tensor_bytes[:cut], {"truncated"})
    for _ in range(30):
        cut = rng.randrange(len(manifest_bytes))
        add("truncate manifest", manifest_bytes[:cut], tensor_bytes, {"damaged", "format"})
    for n in (1, 8, 4096):
        add("extend tensors", manifest_bytes, tensor_bytes + bytes(n), {"truncated"})
        add("extend manifest", manifest_bytes + b" " * n, tensor_bytes, {"damaged"})
    add("empty manifest", b"", tensor_bytes, {"damaged"})
    add("missing tensors", manifest_bytes, None, {"missing"})
    add("swapped tensors", manifest_bytes, other_tensors, {"damaged", "truncated"})
    for label, edited, reasons in _edits(manifest, rng):  # stale checksum: refused as damaged
        add(f"edit {label} (stale checksum)", canonical_json(edited) + b"\n", tensor_bytes, {"damaged"} | reasons)
    for label, edited, reasons in _edits(manifest, rng):  # checksum recomputed: the semantic checks must refuse
        add(
            f"edit {label} (resealed)",
            _resealed(edited),
            tensor_bytes,
            reasons,
            damaged=label
            not in (
                "layers_dropped",
                "layer_total",
                "tail_begin",
                "tail_capacity",
                "class_fields",
                "segment_dropped",
                "class_unknown",
                "tensor_renamed",
                "seq_length",
            ),
        )
    for field in ("model", "tokenizer", "tokens", "file", "classes", "strides", "cache", "config", "seq_length"):
        for value in (None, 7, "x", [1], {}):  # fields of the wrong type, resealed: refused, never a crash
            if field == "tokenizer" and value is None or manifest.get(field) == value:
                continue  # a file without tokenizer fingerprint is valid; an unchanged field is no edit
            edited = {**json.loads(manifest_bytes), field: value}
            add(f"type {field}={value!r} (resealed)", _resealed(edited), tensor_bytes, ALL_REASONS, damaged=False)
    edited = json.loads(manifest_bytes)  # a manifest re-written with other whitespace / key order
    add("pretty-printed manifest", json.dumps(edited, indent=1).encode(), tensor_bytes, {"damaged"})

    built = []
    real_init = PackedCache.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(PackedCache, "__init__", counting_init)
    crashes, accepted = [], []
    for label, path, reasons, damaged in cases:
        before = len(built)
        try:
            result = load_cache(path, model, CONFIG, tok)
            accepted.append((label, result))
        except CacheFileError as err:
            assert err.reason in reasons, (label, err.reason, str(err))
            assert len(str(err)) > 20
            if damaged:
                assert len(built) == before, f"{label}: a cache was constructed before the damage was found"
        except Exception as err:  # noqa: BLE001 - counted: there must be none
            crashes.append((label, repr(err)))
        shutil.rmtree(path)

    # mismatched loads of the intact files: other model (same architecture, other weights; other architecture),
    # other PackConfig, other tokenizer
    mismatches = [
        (lambda: load_cache(root / "orig", build_model("llama", seed=1), CONFIG, tok), "model"),
        (lambda: load_cache(root / "orig", build_model("qwen3"), CONFIG, tok), "model"),
        (lambda: load_cache(root / "orig", model, PackConfig.preset("balanced"), tok), "config"),
        (lambda: load_cache(root / "orig", model, CONFIG.replace(window=17), tok), "config"),
        (lambda: load_cache(root / "orig", model, CONFIG.replace(key_rank=5), tok), "config"),
        (lambda: load_cache(root / "orig", model, CONFIG, FakeTokenizer(shift=1)), "tokenizer"),
    ]
    for make, reason in mismatches:
        with pytest.raises(CacheFileError) as info:
            make()
        assert info.value.reason == reason
    total = len(cases) + len(mismatches)
    print(f"{total} damaged or mismatched loads refused: {len(cases)} damaged files, {len(mismatches)} mismatches")
    assert not crashes, crashes[:5]
    assert not accepted, [a[0] for a in accepted]
    assert total >= 500, total


def test_error_messages_name_the_reason(saved, tmp_path):
    model, tok, root = saved
    shutil.copytree(root / "orig", tmp_path / "c")
    data = bytearray((tmp_path / "c" / TENSORS).read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes
    (tmp_path / "c" / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match=r"does not match the manifest's sha256 \(tensor .* differ"):
        load_cache(tmp_path / "c", model, CONFIG, tok)
    with pytest.raises(CacheFileError, match="another PackConfig: window=16 \\(yours 64\\)"):
        load_cache(root / "orig", model, CONFIG.replace(window=64), tok)
    with pytest.raises(CacheFileError, match="another model: its weights differ"):
        load_cache(root / "orig", build_model("llama", seed=3), CONFIG, tok)
    with pytest.raises(CacheFileError, match="holds no manifest.json"):
        load_cache(tmp_path / "nothing", model, CONFIG, tok)
    assert issubclass(CacheFileError, ValueError)


def test_in_place_weight_change_changes_fingerprint():
    import torch

    from attentionpack.store import model_fingerprint

    model = build_model("llama")
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1.0
    assert model_fingerprint(model)["weights_sha256"] != before["weights_sha256"]
