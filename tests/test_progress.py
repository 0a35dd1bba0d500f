"""Progress bars tell the truth: `generate`'s prefill bar moves per layer during the prefill and the decoding bar
per token after it (`eval`'s bars: tests/test_eval.py::test_quality_bars_finish_at_n)."""

from __future__ import annotations

import io

import torch
from helpers import PAD, padded_batch

from attentionpack import PackedCache
from attentionpack.generation import _ProgressStreamer


def test_generate_progress_prefill_per_layer_then_decode_per_token(tiny_model):
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    ids, mask = padded_batch(40, pad=0, batch=1)
    streamer = _ProgressStreamer(model, ids.shape[1], 6, file=io.StringIO())
    seen = []  # (prefill bar position, decoding bar position or None) at every layer of every forward call
    probe = [
        layer.register_forward_hook(
            lambda *a: seen.append((streamer.prefill.n, None if streamer.decode is None else streamer.decode.n))
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=PackedCache(model, "max"),
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                streamer=streamer,
                pad_token_id=PAD,
            )
        decode_n = streamer.decode.n
    finally:
        streamer.end()
        for hook in probe:
            hook.remove()
    prefill = seen[:layers]  # the prompt's forward call: the bar advanced layer by layer, no decoding bar yet
    assert [p for p, _ in prefill[:-1]] == list(range(1, layers)), seen
    assert seen[layers - 1][1] == 0  # the prefill's last layer closed it and opened the decoding bar at 0
    assert streamer.prefill.n == layers
    assert decode_n == 6  # one tick per generated token (the first comes from the prefill's logits)
    decoding = [d for _, d in seen[layers:]]
    assert decoding == sorted(decoding) and decoding[0] == 1  # the step after the prefill's token
