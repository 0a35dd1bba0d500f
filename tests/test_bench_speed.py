"""`attentionpack bench speed`'s throughput at a KV budget, on a tiny random model (code paths, not speed)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB

from attentionpack import cache_nbytes
from attentionpack.bench.speed import throughput_at_budget
from attentionpack.eval.configs import make_cache, parse_config


class ByteTokenizer:
    """Bytes of the text as token ids (mod the tiny vocabulary): enough for a random model."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor(list(text[:20000].encode()), dtype=torch.long) % VOCAB
        return type("Encoding", (), {"input_ids": ids[None]})()


@torch.inference_mode()
def test_throughput_batches_follow_the_budget(tiny_model):
    model, tokenizer, context = tiny_model("llama"), ByteTokenizer(), 160
    specs = [parse_config(n) for n in ("dynamic", "max")]
    ids = tokenizer("x" * context).input_ids
    per_seq = {}
    for sp in specs:  # bytes of one prefilled sequence, measured the way the bench does
        cache = make_cache(model, sp)
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        per_seq[sp.name] = cache_nbytes(cache)
    budget = 3 * per_seq["dynamic"] + 1
    rows = throughput_at_budget(model, tokenizer, specs, budget, context, steps=2)
    assert rows["dynamic"]["batch"] == 3 and rows["dynamic"]["vs_dynamic"] == 1.0
    assert rows["max"]["batch"] == budget // rows["max"]["seq_bytes"] > 3  # compressed: more sequences fit
    assert rows["max"]["seq_bytes"] * rows["max"]["batch"] <= budget
    assert all(r["tokens_per_s"] > 0 for r in rows.values())


@torch.inference_mode()
def test_static_cache_is_a_baseline_in_throughput_and_speed(tiny_model):
    """StaticCache holds the preallocated length of the run, its batch copies decode as DynamicCache's do, and the
    speed summary gives ratios to it beside those to DynamicCache."""
    from attentionpack.bench.speed import _repeat
    from attentionpack.eval.speed import speed_round, summarize

    model, tokenizer, context, steps = tiny_model("llama"), ByteTokenizer(), 160, 2
    specs = [parse_config(n) for n in ("dynamic", "static", "max")]
    ids = tokenizer("y" * (context + 8)).input_ids
    dynamic = make_cache(model, specs[0])
    model(input_ids=ids[:, :context], past_key_values=dynamic, use_cache=True)
    per_token = cache_nbytes(dynamic) // context
    budget = 4 * (per_token * (context + steps + 1) + 8 * len(model.model.layers))
    rows = throughput_at_budget(model, tokenizer, specs, budget, context, steps=steps)
    # preallocated, every slot counted (plus each layer's int64 position counter)
    assert 0 <= rows["static"]["seq_bytes"] - per_token * (context + steps + 1) <= 8 * len(model.model.layers)
    assert rows["static"]["batch"] == 4 and rows["static"]["tokens_per_s"] > 0
    best = max(rows["dynamic"]["tokens_per_s"], rows["static"]["tokens_per_s"])
    assert rows["max"]["vs_best_baseline"] == rows["max"]["tokens_per_s"] / best

    # a repeated StaticCache decodes every row as a repeated DynamicCache does
    static = make_cache(model, specs[1], context + 4)
    model(input_ids=ids[:, :context], past_key_values=static, use_cache=True)
    _repeat(static, 3)
    dynamic.batch_repeat_interleave(3)
    step = ids[:, context : context + 1].expand(3, 1).contiguous()
    a = model(input_ids=step, past_key_values=static, use_cache=True).logits
    b = model(input_ids=step, past_key_values=dynamic, use_cache=True).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    makers = {sp.name: (lambda n, sp=sp: make_cache(model, sp, n)) for sp in specs}
    summary = summarize([speed_round(model, ids, makers, (64, 128), 3)])
    for ctx in (64, 128):
        assert summary["static"][ctx]["decode_ratio_static"] == 1.0
        assert summary["max"][ctx]["decode_ratio_static"] > 0 and summary["max"][ctx]["decode_ratio"] > 0


def test_a_device_the_machine_lacks_is_named():
    from attentionpack import check_device

    check_device("cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        check_device("tpu")
    with pytest.raises(ValueError, match="not a device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            check_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@torch.inference_mode()
def test_throughput_and_speed_run_on_cuda(tiny_model, monkeypatch):
    """The bench's timing loops on a CUDA model: caches built there, steps timed after synchronizing, the
    compressed caches' decoding steps on the Triton kernels (strict: no fallback)."""
    from attentionpack.eval.speed import speed_round

    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    model, tokenizer, context = copy.deepcopy(tiny_model("llama")).to("cuda"), ByteTokenizer(), 160  # (shared model)
    specs = [parse_config(n) for n in ("dynamic", "static", "max", "budget-0.25")]
    rows = throughput_at_budget(model, tokenizer, specs, 2**24, context, steps=2)
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    ids = tokenizer("y" * (context + 8)).input_ids.to("cuda")
    makers = {sp.name: (lambda n, sp=sp: make_cache(model, sp, n)) for sp in specs}
    out = speed_round(model, ids, makers, (128,), 3)
    assert set(out["max"][128]["decode_paths"]) == {"triton"}
