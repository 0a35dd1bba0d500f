"""Does a budget cache lose a needle through its low-rank value candidates? The pass-key prompts of one grid cell
answered by `budget=f` as it is and with the low-rank value candidates taken out of the budget's choice (keys
untouched). Usage: python experiments/needle_lowrank_values.py [gemma3|smollm2] [--length 2048] [--depth 0]
[--trials 3] [--budget 0.125]
"""

from __future__ import annotations

import argparse

import torch

from attentionpack import PackConfig, PackedCache, load_model
from attentionpack.budget import candidates, planner
from attentionpack.eval.data import britannica_text
from attentionpack.eval.needle import eos_ids, greedy_answer, grid_prompts, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="gemma3")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.125)
    a = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_model(a.model)
    haystack = tokenizer(britannica_text(), add_special_tokens=False).input_ids
    prompts = grid_prompts(tokenizer, haystack, [a.length], [a.depth], a.trials, 0)
    encode, mode = candidates.encode_candidates, ["as is"]

    def without_lowrank_values(x, is_key, table, cfg, query_moments=None):
        if mode[0] != "as is" and not is_key:
            table = {label: spec for label, spec in table.items() if spec["codec"] != "lowrank"}
        return encode(x, is_key, table, cfg, query_moments)

    planner.encode_candidates = without_lowrank_values  # type: ignore[assignment]
    eos = eos_ids(model, tokenizer)
    for mode[0] in ("as is", "no low-rank values"):
        rows = []
        for p in prompts:
            make = lambda: PackedCache(model, PackConfig(budget=a.budget))  # noqa: E731
            answer, _, _ = greedy_answer(model, p.context_ids, p.question_ids, make, 10, eos)
            text, hit = score(tokenizer, p, answer)
            rows.append(f"{p.passkey}: {text.strip()[:14]!r} {'hit' if hit else 'miss'}")
        print(f"{a.model} {a.length} depth {a.depth:g} budget={a.budget:g} {mode[0]}: " + " | ".join(rows), flush=True)


if __name__ == "__main__":
    main()
