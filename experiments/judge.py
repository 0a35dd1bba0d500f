"""Does the budget's judge rank encodings as the continuation does? Judged error vs measured KL, per window.

The byte budget (`PackConfig(budget=f)`, attentionpack/budget/planner.py) scores every candidate encoding of every
layer's prompt spans by the attention-output error of the last prompt queries (the judge) and solves a knapsack on
those errors. This experiment checks the judge against what the model really does afterwards:

1. one budget prefill of the window's `context` tokens records, per layer and span, each candidate's bytes and
   judged error (`BudgetPlanner.report`); the judged error of a uniform encoding (key candidate k and value
   candidate v in every layer) is the sum of its layers' errors;
2. for each uniform encoding, a PackedCache with those fixed codecs (`candidate_config`) is prefilled and the next
   `continuation` tokens are teacher-forced; its KL divergence from DynamicCache's next-token distributions, mean
   over the steps, is what the encoding really costs;
3. Spearman's rank correlation between judged error and KL over the encodings; the budget allocations themselves
   (f in `fractions`) are measured too, with their judged error (the sum of the errors of what they chose).

Usage: python experiments/judge.py [smollm2|gemma3|PATH] [--text britannica|play|code] [--windows 1]
(texts and windows: experiments/suite.py)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence

import torch

from attentionpack import PackConfig, PackedCache, load_model
from attentionpack.budget.candidates import candidate_config
from attentionpack.eval.judge import kl, spearman
from experiments.suite import texts, windows

# uniform (key candidate, value candidate) pairs: from near-exact to the cheapest, several per byte level
PAIRS = (
    ("q8", "q8"),
    ("q8", "q4"),
    ("lr0.98c4", "q4"),
    ("q4", "q4"),
    ("lr0.95c4", "q4"),
    ("lr0.9c4", "q4"),
    ("q4", "q2"),
    ("lr0.8c4", "q4"),
    ("lr0.9c4", "q2"),
    ("q2", "q4"),
    ("lr0.6c4", "q2"),
    ("q2", "q2"),
)
FRACTIONS = (0.25, 0.125, 0.0625)


@torch.inference_mode()
def continuation_logprobs(model, cache, window: torch.Tensor, context: int) -> torch.Tensor:
    """(M, V) log-probabilities of the next token at the prompt's end and after each teacher-forced token."""
    out = model(input_ids=window[None, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    rows = [torch.log_softmax(out.logits[0, -1].float(), -1)]
    for i in range(context, window.numel() - 1):
        out = model(input_ids=window[None, i : i + 1], past_key_values=cache, use_cache=True)
        rows.append(torch.log_softmax(out.logits[0, -1].float(), -1))
    return torch.stack(rows)


def judged(report: dict, key: str, value: str) -> tuple[float, int]:
    """(judged error, bytes) of key candidate `key` and value candidate `value` in every layer's prompt spans (the
    recent window is left out: fixed codecs keep it exact). A candidate a span was not offered (low rank on a span
    shorter than its width, or an encoding not smaller than exact) counts as exact there, as fixed codecs store it."""
    err, nbytes = 0.0, 0
    for row in report.values():
        if row["kind"] == "window":
            continue
        for kind, label in (("keys", key), ("values", value)):
            match = [o for o in row[kind] if o[0] == label] or [o for o in row[kind] if o[0] == "exact"]
            nbytes += match[0][1]
            err += match[0][2]
    return err, nbytes


def run_window(
    model, window: torch.Tensor, context: int, echo: Callable[[str], None], fractions: Sequence[float] = FRACTIONS
) -> dict:
    from transformers import DynamicCache

    ref = continuation_logprobs(model, DynamicCache(config=model.config), window, context)
    probe = PackedCache(model, PackConfig(budget=0.25))
    continuation_logprobs(model, probe, window[: context + 1], context)
    assert probe.planner is not None
    report = dict(probe.planner.report)
    rows = []
    for key, value in PAIRS:
        err, nbytes = judged(report, key, value)
        cache = PackedCache(model, candidate_config(PackConfig(), key, value))
        lp = continuation_logprobs(model, cache, window, context)
        rows.append({"encoding": f"{key}/{value}", "judged": err, "kl": kl(ref, lp), "bytes": nbytes})
        echo(f"  {key:>9}/{value:<9} judged {err:9.4f}  KL {rows[-1]['kl']:.5f}  span bytes {nbytes:,}")
    budgets = []
    for f in fractions:
        cache = PackedCache(model, PackConfig(budget=f))
        lp = continuation_logprobs(model, cache, window, context)
        assert cache.planner is not None
        chosen = sum(
            next(o[2] for o in r[kind] if o[0] == r["choice"][i])
            for r in cache.planner.report.values()
            for i, kind in enumerate(("keys", "values"))
        )
        budgets.append({"fraction": f, "judged": chosen, "kl": kl(ref, lp)})
        echo(f"  budget={f:<7g} judged {chosen:9.4f}  KL {budgets[-1]['kl']:.5f}")
    rho = spearman([r["judged"] for r in rows], [r["kl"] for r in rows])
    echo(f"  Spearman(judged, KL) over {len(rows)} uniform encodings: {rho:+.3f}")
    return {"encodings": rows, "budgets": budgets, "spearman": rho}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--text", action="append")
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "1")))
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model)
    for name, text in texts().items():
        if a.text and name not in a.text:
            continue
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
        for i, w in enumerate(windows(ids, a.windows, a.context + a.continuation)):
            print(f"{a.model} {name} window {i}:", flush=True)
            run_window(model, w, a.context, lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
