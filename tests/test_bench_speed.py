"""`attentionpack bench speed`'s throughput at a KV budget, on a tiny random model (code paths, not speed)."""

from __future__ import annotations

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
