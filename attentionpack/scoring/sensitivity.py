"""Layer sensitivity: how much a unit of relative attention-output error in each layer moves the model's output.

The byte budget (budget/planner.py) scores each layer's candidate encodings by a relative attention-output error
and minimizes the sum over layers. A unit of that error does not cost the same everywhere: on Gemma 3 270M the
same relative noise moves the next-token distributions 5-7x more in global layer 11 than in an average layer,
and a budget that ignored it stored that layer at 2-bit keys and 60%-energy values (+12.9% perplexity on one
verse window; docs/eval/layer-sensitivity-2026-12-05.md). This is the layer-wise sensitivity that mixed-precision
quantization weighs bit widths by (HAWQ, arXiv 1905.03696), measured here by perturbation instead of a Hessian.

Probe, once per model: [BOS] + `length` - 1 random non-special ids; for each layer in turn, Gaussian noise of
relative energy `eps` (per token, against the token's own norm) is added to the heads' outputs (the input of the
attention's `o_proj`, where the planner measures its errors) at the last `last` positions, and the layer's
sensitivity is the mean KL(clean || noisy) of the next-token distributions there. The planner weighs a layer's
errors by sqrt(sensitivity / mean sensitivity): the square root shrinks the ratios toward equal weights, since the
probe's error is isotropic and its tokens random while a cache's error is structured and its text real (measured
against the full ratio on Gemma 3 in the document above).

Kept like the retrieval heads: one JSON per model fingerprint and probe setting in <cache root>/sensitivity/.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.registry import ModelAdapter
from ..resources import cache_root
from .probe_files import load_or_probe, parse_json, random_ids, with_bos
from .retrieval_heads import model_fingerprint

FORMAT = 1
LENGTH, LAST, EPS, SEED = 512, 128, 0.01, 0


@dataclass(frozen=True)
class LayerSensitivity:
    """Per-layer KL under the probe's noise, and what it was measured with."""

    kl: np.ndarray  # (L,) mean KL(clean || noisy) per layer at relative noise energy probe["eps"]
    probe: dict  # {"length", "last", "eps", "seed"}
    fingerprint: str

    def weights(self) -> np.ndarray:
        """(L,) the planner's error weights: sqrt(kl / mean kl); all 1 when the probe saw no change at all."""
        mean = float(self.kl.mean())
        if not mean > 0:
            return np.ones_like(self.kl)
        return np.sqrt(self.kl / mean)

    def to_json(self) -> str:
        data = {"format": FORMAT, "fingerprint": self.fingerprint, "probe": self.probe, "kl": self.kl.tolist()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LayerSensitivity:
        """Parse `to_json` output; ValueError naming the problem if the text is not such a file."""

        def build(data: dict) -> LayerSensitivity:
            kl = np.asarray(data["kl"], dtype=np.float64)
            if kl.ndim != 1 or not kl.size or not np.isfinite(kl).all() or (kl < 0).any():
                raise ValueError("kl is not a non-empty vector of finite values >= 0")
            return cls(kl, dict(data["probe"]), str(data["fingerprint"]))

        return parse_json(text, FORMAT, "layer-sensitivity", build)


def probe_ids(config, length: int, seed: int) -> torch.Tensor:
    """[BOS] + random non-special ids, `length` in all (1-D LongTensor)."""
    bos = with_bos(config, torch.empty(0, dtype=torch.long))
    return with_bos(config, random_ids(config, length - len(bos), seed))


@torch.no_grad()
def layer_kl(model, ids: torch.Tensor, last: int = LAST, eps: float = EPS, seed: int = SEED) -> list[float]:
    """Per layer: mean KL(clean || noisy) of the next-token distributions at the last `last` positions of `ids`
    (1, T) when noise of relative energy `eps` is added to that layer's head outputs there (module docstring)."""
    if not 1 <= last < ids.shape[-1]:
        raise ValueError(f"last={last!r} must be in [1, length={ids.shape[-1]}) (positions scored at the prompt's end)")
    projections = []
    for i, module in enumerate(ModelAdapter(model).attention_modules):
        out_proj = getattr(module, "o_proj", None)
        if not isinstance(out_proj, torch.nn.Module):
            raise ValueError(
                f"layer {i}'s attention ({type(module).__name__}) has no o_proj: its per-head output, where the "
                "budget measures errors, cannot be perturbed; use PackConfig(layer_weights=False)"
            )
        projections.append(out_proj)

    def logprobs() -> torch.Tensor:  # (last, V)
        out = model(input_ids=ids, use_cache=False, logits_to_keep=last)
        return out.logits[0, -last:].float().log_softmax(-1)

    clean = logprobs()
    kl = []
    for out_proj in projections:
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)

        def hook(_module, args, gen=gen):
            attn = args[0]  # (1, T, Hq * d): the heads' outputs, where the planner measures its errors
            tail = attn[:, -last:].float()
            noise = torch.randn(tail.shape, generator=gen).to(tail.device)
            noise *= tail.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            attn = attn.clone()
            attn[:, -last:] = (tail + math.sqrt(eps) * noise).to(attn.dtype)
            return (attn, *args[1:])

        handle = out_proj.register_forward_pre_hook(hook)
        try:
            noisy = logprobs()
        finally:
            handle.remove()
        kl.append(float((clean.exp() * (clean - noisy)).sum(-1).mean().clamp_min(0)))
    return kl


def probe_sensitivity(
    model, length: int = LENGTH, last: int = LAST, eps: float = EPS, seed: int = SEED
) -> LayerSensitivity:
    """Measure every layer's sensitivity on the random-token probe (module docstring)."""
    config = model.config.get_text_config(decoder=True)
    device = next(model.parameters()).device
    ids = probe_ids(config, length, seed)[None].to(device)  # (1, T)
    kl = layer_kl(model, ids, last, eps, seed)
    probe = {"length": length, "last": last, "eps": eps, "seed": seed}
    return LayerSensitivity(np.asarray(kl, dtype=np.float64), probe, model_fingerprint(model))


def sensitivity_path(fingerprint: str, probe: dict) -> Path:
    tag = f"L{probe['length']}-n{probe['last']}-e{probe['eps']:g}-s{probe['seed']}"
    return cache_root() / "sensitivity" / f"{fingerprint}-{tag}.json"


def load_or_probe_sensitivity(
    model, length: int = LENGTH, last: int = LAST, eps: float = EPS, seed: int = SEED
) -> LayerSensitivity:
    """The model's layer sensitivities from their file, or probed and saved (a damaged or mismatching file is
    probed again, with a warning)."""
    fp = model_fingerprint(model)
    probe = {"length": length, "last": last, "eps": eps, "seed": seed}
    layers = len(ModelAdapter(model).attention_modules)

    def check(stored: LayerSensitivity) -> None:
        if stored.fingerprint != fp or stored.probe != probe:
            raise ValueError("it was made for another model or probe")
        if stored.kl.shape != (layers,):
            raise ValueError(f"it holds {stored.kl.size} layers, the model has {layers}")

    return load_or_probe(
        sensitivity_path(fp, probe),
        "layer-sensitivity",
        LayerSensitivity.from_json,
        check,
        lambda: probe_sensitivity(model, length, last, eps, seed),
        LayerSensitivity.to_json,
    )
