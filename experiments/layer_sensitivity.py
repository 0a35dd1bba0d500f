"""How much does each layer's attention-output error move the model's predictions? Noise sensitivity per layer.

The byte budget (attentionpack/budget/planner.py) sums every layer's relative attention-output error as if a unit
of it cost the same in every layer. This experiment measures what it costs: for each layer in turn, Gaussian
noise of relative energy `eps` (per token, against the token's own output norm) is added to the attention output
(the input of `o_proj`) at the last `last` positions of a prompt, and the mean KL divergence of the next-token
distributions at those positions from the clean run is printed; the last line gives each layer's KL relative to
the mean over layers.

Usage: python experiments/layer_sensitivity.py smollm2|gemma3|PATH britannica|play|code|random [--window 0]
[--eps 0.01] [--length 2048]   ("random": uniform random token ids, seed = --window)
"""

from __future__ import annotations

import argparse
import math

import torch

from attentionpack import load_model
from experiments.suite import texts, windows


@torch.inference_mode()
def sensitivities(model, ids: torch.Tensor, eps: float, last: int) -> list[float]:
    """Mean KL (clean || noisy) over the last `last` positions, one per layer; ids (T,)."""
    ref = model(input_ids=ids[None], use_cache=False).logits[0, -last:].float().log_softmax(-1)
    out = []
    for layer in model.model.layers:
        gen = torch.Generator().manual_seed(0)

        def hook(_module, args, gen=gen):
            x = args[0].clone()  # (1, T, Hq * d)
            seg = x[:, -last:]
            noise = torch.randn(seg.shape, generator=gen)
            noise *= seg.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True) * math.sqrt(eps)
            x[:, -last:] = seg + noise
            return (x, *args[1:])

        handle = layer.self_attn.o_proj.register_forward_pre_hook(hook)
        try:
            noisy = model(input_ids=ids[None], use_cache=False).logits[0, -last:].float().log_softmax(-1)
        finally:
            handle.remove()
        out.append(float((ref.exp() * (ref - noisy)).sum(-1).mean()))
    return out


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
    kl = sensitivities(model, ids, a.eps, min(256, a.length // 4))
    for i, k in enumerate(kl):
        print(i, f"{k:.5f}")
    mean = sum(kl) / len(kl)
    print("rel", " ".join(f"{k / mean:.2f}" for k in kl))


if __name__ == "__main__":
    main()
