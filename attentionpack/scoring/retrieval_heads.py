"""Retrieval heads (RazorAttention, arXiv 2407.15891): the few KV heads that must keep their whole cache.

Probe: a random-token sequence written twice ([BOS] x x). While reading the second copy, an *induction* head
attends to the token that followed the current token in the first copy, an *echo* head to the current token's
first occurrence. A head's score is the mean attention mass its queries in the second copy put on those targets
(induction + echo, each in [0, 1]); with GQA a KV head takes the max over its query heads, since keeping the KV
head's cache serves every query head of its group. The top `fraction` of (layer, KV head) pairs are retrieval
heads; the others can keep sinks, a recent window and a compensation token.

The probe runs once per model; the result is kept as JSON named by a fingerprint of the model (config + a
checksum of the weights) in ~/.cache/attentionpack/heads/ ($ATTENTIONPACK_CACHE overrides the root) or, on
request, beside a local model folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models.registry import ModelAdapter
from ..resources import cache_root
from .observation import attention_scaling, window_attention, window_queries
from .probe_files import load_or_probe, parse_json, random_ids, with_bos

FORMAT = 1


@dataclass
class RetrievalHeads:
    """Per (layer, KV head) probe scores and the chosen retrieval heads."""

    induction: np.ndarray  # (L, H) mean attention on the token after the earlier occurrence
    echo: np.ndarray  # (L, H) mean attention on the earlier occurrence itself
    fraction: float
    probe: dict  # {"length": int, "seeds": [int, ...]}
    fingerprint: str
    chosen: frozenset = field(init=False)  # {(layer, head)}

    def __post_init__(self):
        self.chosen = frozenset(_top(self.scores, self.fraction))

    @property
    def scores(self) -> np.ndarray:
        return self.induction + self.echo  # (L, H)

    def mask(self) -> np.ndarray:
        """Bool (L, H): True for retrieval heads."""
        m = np.zeros(self.scores.shape, dtype=bool)
        for layer, head in self.chosen:
            m[layer, head] = True
        return m

    def top(self, k: int = 10) -> list[tuple[int, int, float, float]]:
        """The k best heads as (layer, head, induction, echo), best first."""
        order = np.argsort(-self.scores, axis=None, kind="stable")[:k]
        return [
            (
                int(i // self.scores.shape[1]),
                int(i % self.scores.shape[1]),
                float(self.induction.flat[i]),
                float(self.echo.flat[i]),
            )
            for i in order
        ]

    def with_fraction(self, fraction: float) -> RetrievalHeads:
        """The same scores with another share of heads chosen (no new probe)."""
        return RetrievalHeads(self.induction, self.echo, _check_fraction(fraction), self.probe, self.fingerprint)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "probe": self.probe,
                "fraction": self.fraction,
                "induction": self.induction.tolist(),
                "echo": self.echo.tolist(),
                "chosen": sorted(list(p) for p in self.chosen),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> RetrievalHeads:
        """Parse `to_json` output; ValueError naming the problem if the text is not such a file."""

        def build(data: dict) -> RetrievalHeads:
            induction = np.asarray(data["induction"], dtype=np.float64)
            echo = np.asarray(data["echo"], dtype=np.float64)
            if induction.ndim != 2 or induction.shape != echo.shape or not np.isfinite(induction + echo).all():
                raise ValueError("induction/echo are not finite (layers, heads) arrays of one shape")
            fraction = _check_fraction(data["fraction"])
            return cls(induction, echo, fraction, dict(data["probe"]), str(data["fingerprint"]))

        return parse_json(text, FORMAT, "retrieval-heads", build)


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} is invalid: must be a share of heads in [0, 1]")
    return float(fraction)


def _top(scores: np.ndarray, fraction: float) -> list[tuple[int, int]]:
    n = math.ceil(fraction * scores.size - 1e-9)
    order = np.argsort(-scores, axis=None, kind="stable")[:n]
    return [(int(i // scores.shape[1]), int(i % scores.shape[1])) for i in order]


def model_fingerprint(model) -> str:
    """sha256 of the model's config and a strided sample (~4k values) of every parameter, with names and shapes."""
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def probe_tokens(config, length: int, seed: int) -> torch.Tensor:
    """[BOS] + x + x for random non-special ids x of `length` tokens (1-D LongTensor)."""
    x = random_ids(config, length, seed)
    return with_bos(config, torch.cat([x, x]))


@torch.no_grad()
def probe_scores(model, length: int = 256, seeds: tuple[int, ...] = (0, 1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Induction and echo scores (L, H_kv) from one batched forward over the repeated-token probes."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 4:
        raise ValueError(f"length={length!r} is invalid: must be an integer >= 4 (tokens per copy)")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds={seeds!r} is invalid: must be a non-empty sequence of integers")
    from transformers import DynamicCache

    adapter = ModelAdapter(model)
    device = next(model.parameters()).device
    ids = torch.stack([probe_tokens(model.config, length, s) for s in seeds]).to(device)  # (B, T)
    t = ids.shape[1]
    off = t - 2 * length  # 1 with BOS
    captured: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        captured[module.layer_idx] = (
            kwargs.get("hidden_states", args[0] if args else None),
            kwargs["position_embeddings"],
        )

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in adapter.attention_modules]
    cache = DynamicCache()  # no config: sliding layers keep every key too
    try:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    j = torch.arange(length, device=device)  # the second copy is the last `length` tokens
    induction, echo = [], []
    valid = torch.ones_like(ids, dtype=torch.bool)
    for layer, attn in enumerate(adapter.attention_modules):
        hidden, pe = captured[layer]
        q = window_queries(attn, hidden, pe, length)  # (B, Hq, length, d)
        keys = getattr(cache.layers[layer], "keys", None)  # (B, H, T, d)
        assert isinstance(keys, torch.Tensor), "a DynamicCache layer holds its keys"
        probs = window_attention(
            q, keys, valid, scaling=attention_scaling(attn), sliding_window=adapter.layers[layer].sliding_window
        )  # (B, H, G, length, T)
        ind = probs[..., j, off + j + 1]  # (B, H, G, length)
        ech = probs[..., j, off + j]
        induction.append(ind.mean(dim=(0, 3)).amax(dim=-1))  # (H,) max over the group's query heads
        echo.append(ech.mean(dim=(0, 3)).amax(dim=-1))
    return torch.stack(induction).double().cpu().numpy(), torch.stack(echo).double().cpu().numpy()


def find_retrieval_heads(
    model, fraction: float = 0.15, length: int = 256, seeds: tuple[int, ...] = (0, 1, 2)
) -> RetrievalHeads:
    """Probe `model` and choose the top `fraction` of (layer, KV head) pairs by induction + echo score."""
    fraction = _check_fraction(fraction)
    induction, echo = probe_scores(model, length, tuple(seeds))
    return RetrievalHeads(induction, echo, fraction, {"length": length, "seeds": list(seeds)}, model_fingerprint(model))


def heads_dir() -> Path:
    root = cache_root()
    return root / "heads"


def expected_shape(model) -> tuple[int, int]:
    """(layers, KV heads) of `model`: the shape of its probe scores (every layer has the same KV head count)."""
    layers = ModelAdapter(model).layers
    return len(layers), max(spec.num_kv_heads for spec in layers)


def heads_path(
    model,
    folder: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    length: int = 256,
    seeds: tuple[int, ...] = (0, 1, 2),
) -> Path:
    """Where the heads of `model` for one probe setting are kept: <folder>/attentionpack-heads-<fp16>-<probe>.json
    or <heads_dir>/<fp>-<probe>.json, <probe> like "L256-s0_1_2"."""
    fp = fingerprint or model_fingerprint(model)
    tag = f"L{length}-s{'_'.join(str(s) for s in seeds)}"
    if folder is not None:
        return Path(folder) / f"attentionpack-heads-{fp[:16]}-{tag}.json"
    return heads_dir() / f"{fp}-{tag}.json"


def load_or_find(
    model,
    fraction: float = 0.15,
    length: int = 256,
    seeds: tuple[int, ...] = (0, 1, 2),
    folder: str | os.PathLike | None = None,
    beside_model: bool = False,
) -> RetrievalHeads:
    """The model's retrieval heads from its file if present (re-choosing `fraction` from the stored scores),
    otherwise probed and saved. `beside_model` keeps the file in the model's local folder (model.name_or_path);
    `folder` names any folder. A damaged or mismatching file is recomputed and overwritten, with a warning."""
    fraction = _check_fraction(fraction)
    if beside_model and folder is None:
        name = str(getattr(model, "name_or_path", "") or "")
        local = Path(name)
        if not name or not local.is_dir():
            raise ValueError(
                f"beside_model=True but the model's name_or_path {str(local)!r} is not a local folder; "
                "pass folder=... or leave beside_model False for the user cache"
            )
        folder = local
    fp = model_fingerprint(model)
    path = heads_path(model, folder, fp, length, tuple(seeds))
    probe = {"length": length, "seeds": list(seeds)}

    def check(stored: RetrievalHeads) -> None:
        if stored.fingerprint != fp or stored.probe != probe:
            raise ValueError("it was made for another model or probe")
        shape = expected_shape(model)
        if tuple(stored.scores.shape) != shape:
            raise ValueError(f"its scores are {tuple(stored.scores.shape)}, the model has (layers, KV heads) {shape}")

    heads = load_or_probe(
        path,
        "retrieval-heads",
        RetrievalHeads.from_json,
        check,
        lambda: find_retrieval_heads(model, fraction, length, tuple(seeds)),
        RetrievalHeads.to_json,
    )
    return heads.with_fraction(fraction)
