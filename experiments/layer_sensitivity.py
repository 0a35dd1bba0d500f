"""How much does each layer's attention-output error move the model's predictions? Noise sensitivity per layer.

The byte budget (attentionpack/budget/planner.py) sums every layer's relative attention-output error as if a unit
of it cost the same in every layer. This experiment measures what it costs: for each layer in turn, Gaussian
noise of relative energy `eps` (per token, against the token's own output norm) is added to the attention output
(the input of `o_proj`) at the last `last` positions of a prompt, and the mean KL divergence of the next-token
distributions at those positions from the clean run is printed; the last line gives each layer's KL relative to
the mean over layers.

Usage: python -m experiments.layer_sensitivity smollm2|gemma3|PATH britannica|play|code|random [--window 0]
[--eps 0.01] [--length 2048]   ("random": uniform random token ids, seed = --window)
"""

from __future__ import annotations

import argparse

import torch

from attentionpack import load_model
from attentionpack.scoring.sensitivity import layer_kl
from experiments.suite import texts, windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--length", type=int, default=2048)
    a = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(a.model)
    if a.text == "random":
        gen = torch.Generator().manual_seed(a.window)
        ids = torch.randint(100, tokenizer.vocab_size - 100, (a.length,), generator=gen)
    else:
        full = tokenizer(texts()[a.text], return_tensors="pt", add_special_tokens=False).input_ids[0]
        ids = windows(full, 2, a.length + 256)[a.window][: a.length]
    kl = layer_kl(model, ids[None], min(256, a.length // 4), a.eps, seed=-1)  # noise generator seed 0, as measured
    for i, k in enumerate(kl):
        print(i, f"{k:.5f}")
    mean = sum(kl) / len(kl)
    print("rel", " ".join(f"{k / mean:.2f}" for k in kl))


if __name__ == "__main__":
    main()
