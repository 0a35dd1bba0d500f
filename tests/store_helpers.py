"""Helpers of the store tests: prefill a cache, decode two caches side by side, file sizes, the Gemma 3 model."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import padded_batch

from attentionpack import PackedCache


def prefill(model, config, prompt: int = 300, pad: int = 20, batch: int = 2, seed: int = 0, decode: int = 0):
    """A cache after a left-padded random prompt (and `decode` greedy steps). Returns (cache, ids, mask, next ids)
    where ids (B, cache length) are the tokens the cache holds and next (B, 1) the token to feed next."""
    ids, mask = padded_batch(prompt, pad=pad, batch=batch, seed=seed)
    cache = PackedCache(model, config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(decode):
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            logits = model(input_ids=nxt, attention_mask=mask, past_key_values=cache).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
    return cache, ids, mask, nxt


def decode_both(model, first, second, mask, nxt, steps: int = 32, **kwargs):
    """Greedy-decode `steps` tokens with each cache from the same state; returns the two logits stacks
    (steps, B, V). The tokens fed are the first cache's choices, so the two runs see the same inputs."""
    a, b = [], []
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            at = torch.arange(first.get_seq_length(), first.get_seq_length() + 1)  # (Qwen2-VL needs it explicit)
            la = model(input_ids=nxt, attention_mask=mask, past_key_values=first, cache_position=at, **kwargs)
            lb = model(input_ids=nxt, attention_mask=mask, past_key_values=second, cache_position=at, **kwargs)
            la, lb = la.logits[:, -1], lb.logits[:, -1]
            a.append(la)
            b.append(lb)
            nxt = la.argmax(-1, keepdim=True)
    return torch.stack(a), torch.stack(b)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def gemma3_path() -> Path:
    """The Gemma 3 270M GGUF, assembled once into ~/.cache/attentionpack/ (the library's `gemma3_file`)."""
    from attentionpack.models import gemma3_file

    return gemma3_file(Path.home() / ".cache" / "attentionpack")


STRESS_CONFIG = {"key_rank": 4, "value_codec": "quant", "value_bits": 4, "chunk": 16, "window": 8, "min_span": 8}


def stress_tokens(worker: int, i: int) -> torch.Tensor:
    """The prompt worker `worker` stores at iteration i (derivable by any process from the entry's info)."""
    gen = torch.Generator().manual_seed(1000 * worker + i)
    n = 20 + (7 * i + 13 * worker) % 50
    return torch.randint(3, 128, (n,), generator=gen)


def store_worker(folder: str, worker: int, seconds: float, max_iters: int, out: str) -> None:
    """One process of the concurrency test: alternately store a new prompt's cache and load a random entry
    (written by either process) through the store, checking every loaded cache's tokens; writes a JSON report."""
    import json
    import random
    import time
    import warnings

    from tiny_models import build_model

    from attentionpack import PackConfig
    from attentionpack.store import CacheFileError, PrefixStore, load_cache
    from attentionpack.store.prefix import prefill_prefix

    torch.set_num_threads(1)
    model = build_model("llama")
    config = PackConfig(**STRESS_CONFIG)
    store = PrefixStore(folder, max_bytes=1 << 40, block=16)
    rng = random.Random(worker)
    report = {"written": [], "reads": 0, "cross_reads": 0, "errors": []}
    deadline = time.time() + seconds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(max_iters):
            if time.time() > deadline:
                break
            ids = stress_tokens(worker, i)
            cache = PackedCache(model, config)
            prefill_prefix(model, cache, ids[None])
            report["written"].append(store.put(ids, cache, info={"worker": worker, "i": i}))
            entries = store.entries()
            entry = rng.choice(entries)
            want = stress_tokens(entry.info["worker"], entry.info["i"])
            prompt = torch.cat([want, torch.tensor([5, 6, 7])])
            try:
                loaded, covered = store.load(prompt, model, config)
                direct = load_cache(store.entries_dir / entry.key, model, config)
            except CacheFileError as err:
                report["errors"].append(f"{entry.key}: {err}")
                continue
            if (
                loaded is None
                or covered != want.numel()
                or not torch.equal(loaded.tokens[0], want)
                or not torch.equal(direct.tokens[0], want)
            ):
                report["errors"].append(f"{entry.key}: wrong or no cache for {want.numel()} tokens ({covered})")
            report["reads"] += 1
            report["cross_reads"] += entry.info["worker"] != worker
    report["errors"] += [str(w.message) for w in caught if "prefix store" in str(w.message)]
    with open(out, "w") as f:
        json.dump(report, f)
