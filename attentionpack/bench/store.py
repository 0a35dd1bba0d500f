"""`python -m attentionpack.bench.store`: what saving and reloading a compressed prefix buys (one run, one process).

Time to first token on the embedded model for prompts of the Britannica text (default 2,048 and 8,192 tokens):
(a) prefill: a fresh cache prefills the first N-1 tokens, then the last token gives the first new token;
(b) reload: the cache of the first N-1 tokens, saved in (a), is loaded from disk (every check of
    `store.load_cache`: manifest checksum, fingerprints, sha256 of the tensors file), then the last token gives
    the first new token.
The first token's logits of (a) and (b) are compared bit for bit. The model fingerprint is computed once per model
object (memoized) and reported separately. Files are read from the page cache (they were just written).

Retrieval on reloaded caches: needle prompts (eval/needle.py: a pass key in a document of 1k-4k tokens); the
document part alone is prefilled and compressed, saved and reloaded; the question is then appended to the live
and to the reloaded cache (a multi-token call on a compressed cache) and each answers greedily; the answers must be
equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .. import PackConfig, PackedCache
from ..store import TENSORS, load_cache, model_fingerprint


def _configs(budget: float) -> dict[str, PackConfig]:
    return {"balanced": PackConfig.preset("balanced"), f"budget={budget:g}": PackConfig(budget=budget)}


@torch.inference_mode()
def ttft_rows(model, tokenizer, lengths, budget: float, repeats: int, folder: Path) -> list[dict]:
    from ..eval.data import britannica_text, token_ids

    ids = token_ids(tokenizer, britannica_text(), max(lengths), "the Britannica text")[None]
    for config in _configs(budget).values():  # warm-up (kernel compilation, first-call allocations): not timed
        warm = PackedCache(model, config)
        model(input_ids=ids[:, :256], past_key_values=warm, use_cache=True, logits_to_keep=1)
        model(input_ids=ids[:, 256:257], past_key_values=warm, use_cache=True)
    rows = []
    for n in lengths:
        prompt = ids[:, :n]
        for name, config in _configs(budget).items():
            cache = PackedCache(model, config)
            t0 = time.perf_counter()
            model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            path = folder / f"{n}-{name}"
            cache.save(path, tokens=prompt[:, :-1], tokenizer=tokenizer)
            saved_s = time.perf_counter() - t1
            nbytes, dynamic = cache.nbytes(), cache.dynamic_nbytes()
            t2 = time.perf_counter()
            live = model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
            prefill_ttft = t1 - t0 + time.perf_counter() - t2
            del cache
            loads = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                loaded = load_cache(path, model, config, tokenizer)
                t1 = time.perf_counter()
                again = model(input_ids=prompt[:, -1:], past_key_values=loaded.cache, use_cache=True).logits[:, -1]
                loads.append((time.perf_counter() - t0, t1 - t0))
            load_ttft = statistics.median(t for t, _ in loads)
            files = sum(f.stat().st_size for f in path.iterdir())
            rows.append(
                {
                    "tokens": n,
                    "config": name,
                    "prefill_ttft_s": prefill_ttft,
                    "load_ttft_s": load_ttft,
                    "load_only_s": statistics.median(t for _, t in loads),
                    "speedup": prefill_ttft / load_ttft,
                    "save_s": saved_s,
                    "file_bytes": files,
                    "tensors_file_bytes": (path / TENSORS).stat().st_size,
                    "nbytes": nbytes,
                    "dynamic_bytes": dynamic,
                    "same_logits": bool(torch.equal(live, again)),
                    "same_token": int(live.argmax()) == int(again.argmax()),
                }
            )
            print(_ttft_line(rows[-1]), flush=True)
    return rows


def _ttft_line(r: dict) -> str:
    return (
        f"{r['tokens']:>6,} {r['config']:<14} prefill+1st {r['prefill_ttft_s']:8.2f} s   load+1st "
        f"{r['load_ttft_s']:6.3f} s (load {r['load_only_s']:.3f} s)   {r['speedup']:7.1f}x   file "
        f"{r['file_bytes'] / 2**20:6.2f} MiB (cache {r['nbytes'] / 2**20:.2f} MiB, DynamicCache "
        f"{r['dynamic_bytes'] / 2**20:.1f} MiB)   logits equal: {r['same_logits']}"
    )


@torch.inference_mode()
def needle_rows(model, tokenizer, lengths, depths, budget: float, folder: Path) -> list[dict]:
    from .. import BudgetError
    from ..eval.data import britannica_text, token_ids
    from ..eval.needle import _greedy_from, eos_ids, grid_prompts, score

    hay = token_ids(tokenizer, britannica_text(), 8192, "the Britannica text").tolist()
    eos = eos_ids(model, tokenizer)
    rows = []
    for prompt in grid_prompts(tokenizer, hay, lengths, depths, trials=1, seed=15):
        for name, config in _configs(budget).items():
            cache = PackedCache(model, config)
            context = torch.tensor([prompt.context_ids])
            try:
                model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
            except BudgetError as err:
                rows.append({"length": prompt.length, "depth": prompt.depth, "config": name, "error": str(err)})
                print(f"{prompt.length:>6} depth {prompt.depth:.2f} {name:<14} budget infeasible", flush=True)
                continue
            path = folder / f"needle-{prompt.length}-{prompt.depth}-{name}"
            cache.save(path, tokens=context, tokenizer=tokenizer)
            reloaded = load_cache(path, model, config, tokenizer).cache
            question = torch.tensor([prompt.question_ids])
            answers = {}
            for label, c in (("live", cache), ("reloaded", reloaded)):
                logits = model(input_ids=question, past_key_values=c, use_cache=True, logits_to_keep=1).logits[:, -1]
                ids, _ = _greedy_from(model, c, logits, 10, eos)
                answers[label] = (ids, *score(tokenizer, prompt, ids))
            rows.append(
                {
                    "length": prompt.length,
                    "depth": prompt.depth,
                    "config": name,
                    "passkey": prompt.passkey,
                    "live_answer": answers["live"][1],
                    "reloaded_answer": answers["reloaded"][1],
                    "live_hit": answers["live"][2],
                    "reloaded_hit": answers["reloaded"][2],
                    "equal": answers["live"][0] == answers["reloaded"][0],
                }
            )
            r = rows[-1]
            print(
                f"{r['length']:>6} depth {r['depth']:.2f} {name:<14} live {r['live_answer']!r:<16} "
                f"reloaded {r['reloaded_answer']!r:<16} hit {r['live_hit']}/{r['reloaded_hit']} "
                f"equal {r['equal']}",
                flush=True,
            )
    return rows


def run(
    lengths=(2048, 8192),
    budget: float = 0.125,
    repeats: int = 3,
    needle_lengths=(1024, 2048, 4096),
    depths=(0.1, 0.5, 0.9),
    out: Path | None = None,
    model_path: str | None = None,
) -> dict:
    from ..models import load_model

    model, tokenizer = load_model(model_path)
    t0 = time.perf_counter()
    model_fingerprint(model)
    fingerprint_s = time.perf_counter() - t0
    print(
        f"model fingerprint (once per model object, memoized): {fingerprint_s:.2f} s; torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="attentionpack-bench-store-") as tmp:
        ttft = ttft_rows(model, tokenizer, lengths, budget, repeats, Path(tmp)) if lengths else []
        needle = needle_rows(model, tokenizer, needle_lengths, depths, budget, Path(tmp)) if needle_lengths else []
    result = {
        "fingerprint_s": fingerprint_s,
        "threads": torch.get_num_threads(),
        "ttft": ttft,
        "needle": needle,
        "needle_all_equal": all(r.get("equal", True) for r in needle),
    }
    print(
        f"needle: reloaded answers equal live answers in {sum(r.get('equal', False) for r in needle)} of "
        f"{sum('equal' in r for r in needle)} prompts",
        flush=True,
    )
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192], help="prompt lengths (none: skip)")
    p.add_argument("--budget", type=float, default=0.125)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--needle-lengths", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    run(tuple(a.tokens), a.budget, a.repeats, tuple(a.needle_lengths), tuple(a.depths), a.out, a.model)


if __name__ == "__main__":
    main()
