"""Shared test helpers: inputs, generation with either cache, manual decoding loops, independent byte accounting."""

from __future__ import annotations

import dataclasses

import torch
from tiny_models import VOCAB
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

PAD = 0


def padded_batch(prompt_len: int, pad: int = 7, seed: int = 0, batch: int = 2):
    """Random token ids (batch, prompt_len); the last row is left-padded by `pad` tokens (mask 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, prompt_len), generator=gen)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    if pad:
        ids[-1, :pad] = PAD
        mask[-1, :pad] = 0
    return ids, mask


class CacheRecorder(LogitsProcessor):
    """A no-op logits processor that snapshots `cache.stats()` after every forward call of `generate`."""

    def __init__(self, cache):
        self.cache = cache
        self.snapshots: list[dict] = []

    def __call__(self, input_ids, scores):
        self.snapshots.append(self.cache.stats())
        return scores

    def runs(self):
        """Every run row seen in any snapshot."""
        return [run for snap in self.snapshots for layer in snap["layers"] for run in layer["runs"]]


def greedy(model, cache, ids, mask, new_tokens: int = 64, recorder: CacheRecorder | None = None, **kwargs):
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=PAD,
            logits_processor=LogitsProcessorList([recorder] if recorder else []),
            **kwargs,
        )


def dynamic_cache(model):
    return DynamicCache(config=model.config)


def manual_decode(model, cache, ids, mask, steps: int, explicit_positions: bool = False):
    """Prefill, then `steps` greedy 1-token forward calls with a growing attention mask.

    Returns the logits of every step's last position (steps + 1, B, V) and the generated tokens (B, steps + 1).
    With `explicit_positions` the position ids are computed from the padding mask (as `generate` does)."""
    logits, tokens = [], []
    mask = mask.clone()
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp_min(0) if explicit_positions else None
        kw = {"position_ids": pos} if explicit_positions else {}
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **kw)
        for step in range(steps + 1):
            last = out.logits[:, -1, :]
            logits.append(last)
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt)
            if step == steps:
                break
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=-1)
            if explicit_positions:
                kw = {"position_ids": pos[:, -1:] + 1 + step}
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True, **kw)
    return torch.stack(logits), torch.cat(tokens, dim=-1)


def runs_of(cache, layer: int = 0):
    return cache.stats()["layers"][layer]["runs"]


# ---- independent byte accounting ------------------------------------------------------------------------------


def walk_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through object attributes, dataclass fields, lists, tuples, sets and
    dicts. Written independently of `PackedCache.tensors()` so that a tensor the cache forgets to report is found."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            continue
        if obj is None or isinstance(obj, (int, float, str, bytes, bool, torch.dtype, torch.device, type)):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            raise AssertionError(f"cache layers reference a module ({type(obj).__name__}); walk would leave the cache")
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        else:
            if dataclasses.is_dataclass(obj):
                stack.extend(getattr(obj, f.name) for f in dataclasses.fields(obj))
            if hasattr(obj, "__dict__"):
                stack.extend(vars(obj).values())
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return found


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (each counted once, whole)."""
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    """Storage bytes held by a transformers DynamicCache (keys and values of every layer)."""
    tensors = []
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                tensors.append(t)
    return storage_bytes(tensors)


def compressed_runs(cache) -> list[dict]:
    """Stored runs (any layer) whose keys or values are encoded (any codec but "exact")."""
    return [
        r
        for layer in cache.stats()["layers"]
        for r in layer["runs"]
        if r["keys"]["codec"] != "exact" or r["values"]["codec"] != "exact"
    ]
