"""Which mixes of rank, bits and eviction can hold 1/2 ... 1/16 of DynamicCache's bytes, and at what cost?

On the embedded model: prefill `--prompt` Britannica tokens plus `--future` held-out tokens. Per layer, every
candidate (eviction keep share x key encoding x value encoding) of the compressed region (all prompt tokens but
`--sink` first and `--recent` last, which stay exact) gets its bytes and two attention-output errors:
  obs    - the last `--obs` prompt queries (what a cache can measure at prefill; biased for eviction, since
           those queries chose the kept tokens),
  future - the next `--future` tokens' queries (held out: what decoding will see).
The allocator (attentionpack.budget) then picks one candidate per layer for each budget, minimizing the summed obs
error (deployable) or future error (oracle), and the perplexity of the `--ppl` tokens after the prompt is measured
with the picked encodings in place of the prompt's K/V (per-head eviction through an attention wrapper).

Run: nice -n 19 env OMP_NUM_THREADS=1 python -m attentionpack.bench.frontier_probe   (~7 min at the defaults)

Measured (defaults, offset 0; base PPL 30.984 over 256 tokens; one text, so +-0.3% is noise):
  budget  chosen by obs error       chosen by future error (oracle)
  1/2     -0.03% (q8/q8 everywhere)  -0.03%
  1/4     +2.88%                     -0.07%
  1/8     +4.43%                     -0.06%  (9 layers 1/q4/q4, 7 0.5/q4/q4, 4 0.25/q4/q4, 2 1/lr.99c8/q4, ...)
  1/16    +7.78%                     +1.24%  (mixes of 0.25-0.5 keep with q4 and lr.98c4 keys / lr.90c4 values)
  KIVI-4 everywhere 5.8x -0.26%, KIVI-2 everywhere 9.1x +6.83%.
The obs error is blind to eviction damage (the window that chose the tokens barely attends to the dropped ones):
it must not be the allocator's error measure as is.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import Counter

import torch
import torch.nn.functional as F

from ..budget import Option, allocate
from ..codecs.evict import kept_mask, select_tokens
from ..codecs.lowrank import RankRule, factorize
from ..codecs.quant import QuantizedLowRankPart, dequantize, quantize_keys, quantize_values
from ..models.registry import ModelAdapter
from ..rope import apply_rope, undo_rope
from ..scoring.observation import attention_scaling, token_importance, window_attention, window_queries

KEY_CODECS = ("q8", "q4", "q2", "lr.99c8", "lr.98c4", "lr.95c4", "lr.90c4")
VALUE_CODECS = ("q8", "q4", "q2", "lr.99c8", "lr.95c4", "lr.90c4")
KEEPS = (1.0, 0.5, 0.25, 0.125)


def encode(name: str, x: torch.Tensor, is_key: bool, cos=None, sin=None) -> tuple[torch.Tensor, int, int]:
    """Reconstruction (1, H, T, d) of x by codec `name`, and its bytes split (per-token part, fixed part)."""
    if name.startswith("q"):
        q = (quantize_keys if is_key else quantize_values)(x, int(name[1:]), 32)
        return dequantize(q), q.nbytes(), 0
    energy, bits = float(name[2:5]), int(name[-1])  # "lr.95c4" -> 0.95, 4
    b, h, t, d = x.shape
    base = undo_rope(x, cos, sin) if is_key else x
    factors, _, _ = factorize(base.transpose(1, 2).reshape(b, t, h * d), RankRule(energy=energy))
    part = QuantizedLowRankPart.from_factors(factors, h, coeff_bits=bits)
    rec = part.factors().reconstruct().view(b, t, h, d).transpose(1, 2)
    if is_key:
        rec = apply_rope(rec, cos, sin)
    per_token = part.coeffs.nbytes() + (4 * t if is_key else 0)  # coefficients (+ int32 positions for RoPE)
    return rec, per_token, sum(tt.numel() * tt.element_size() for tt in part.basis.tensors())


def capture(model, ids):
    """Prefill ids (1, N); per layer (hidden_states, (cos, sin)) and the full keys/values (1, H, N, d)."""
    from transformers import DynamicCache

    adapter, captured = ModelAdapter(model), {}

    def hook(module, args, kwargs):
        captured[module.layer_idx] = (kwargs.get("hidden_states", args[0] if args else None),
                                      kwargs["position_embeddings"])

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in adapter.attention_modules]
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for hd in handles:
            hd.remove()
    return adapter, captured, [(layer.keys, layer.values) for layer in cache.layers]


def layer_candidates(args, adapter, layer, hidden, pe, keys, values):
    """All (keep, K codec, V codec) candidates of one layer: list of dicts with bytes, errors, reconstructions."""
    attn = adapter.attention_modules[layer]
    n_prompt, w = args.prompt, args.obs + args.future
    q = window_queries(attn, hidden, pe, w)  # (1, Hq, obs + future, d): last obs prompt + future queries
    scale = attention_scaling(attn)
    lo, hi = args.sink, n_prompt - args.recent  # compressed region [lo, hi)
    cos, sin = pe[0][:, lo:hi], pe[1][:, lo:hi]
    valid = torch.ones(1, keys.shape[2], dtype=torch.bool)

    def output(k, v, mask):
        probs = window_attention(q, k, mask, scaling=scale)  # (1, H, G, w, N)
        return probs @ v.float().unsqueeze(2)  # (1, H, G, w, d)

    def errors(out):
        diff = (out - exact).square()
        o = args.obs
        return [math.sqrt(diff[..., s, :].sum() / exact[..., s, :].square().sum())
                for s in (slice(0, o), slice(o, None))]

    exact = output(keys, values, valid)
    imp = token_importance(q[:, :, : args.obs], keys[:, :, :n_prompt], valid[:, :n_prompt], pool_kernel=5,
                           pool="avg", scaling=scale).per_head  # (1, H, n_prompt) from the obs queries only
    masks = {}
    for keep in KEEPS:
        for shared in (False, True):  # per-head selection (quant) or one selection for all heads (low rank)
            s = imp.mean(1) if shared else imp
            n = args.sink + args.recent + round(keep * (hi - lo))
            idx = select_tokens(s, n, args.sink, args.recent)
            m = kept_mask(idx, n_prompt)
            m = m.unsqueeze(1).expand_as(imp) if shared else m  # (1, H, n_prompt)
            masks[keep, shared] = torch.cat([m, torch.ones(1, m.shape[1], keys.shape[2] - n_prompt,
                                                           dtype=torch.bool)], -1)
    enc_k = {c: encode(c, keys[:, :, lo:hi], True, cos, sin) for c in KEY_CODECS}
    enc_v = {c: encode(c, values[:, :, lo:hi], False) for c in VALUE_CODECS}
    exact_bytes = 2 * keys[:, :, :n_prompt].numel() // n_prompt * (args.sink + args.recent) * keys.element_size()
    out = []
    for keep in KEEPS:
        for kc, (k_rec, k_tok, k_fix) in enc_k.items():
            shared = kc.startswith("lr")
            k_hat = keys.clone()
            k_hat[:, :, lo:hi] = k_rec
            for vc, (v_rec, v_tok, v_fix) in enc_v.items():
                sh = shared or vc.startswith("lr")
                mask = masks[keep, sh]
                v_hat = values.clone()
                v_hat[:, :, lo:hi] = v_rec
                e_obs, e_fut = errors(output(k_hat, v_hat, mask))
                nbytes = exact_bytes + round(keep * (k_tok + v_tok)) + k_fix + v_fix
                if keep < 1 and not sh:  # per-head eviction keeps an int32 position per kept token and head
                    nbytes += 4 * round(keep * (hi - lo)) * keys.shape[1]
                out.append(dict(keep=keep, k=kc, v=vc, bytes=int(nbytes), obs=e_obs, future=e_fut,
                                k_rec=k_rec, v_rec=v_rec, mask=mask[:, :, :n_prompt]))
    return out


class EvictingAttention:
    """SDPA with an extra per-head keep mask on the prompt keys of some layers (no padding, full attention)."""

    def __init__(self):
        self.masks: dict[int, torch.Tensor] = {}  # layer -> (1, H, n_prompt) bool

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, hq, nq, d = query.shape
        hkv, nk = key.shape[1], key.shape[2]
        g = hq // hkv
        allowed = torch.arange(nk).view(1, nk) <= torch.arange(nk - nq, nk).view(nq, 1)  # (q, N)
        allowed = allowed.view(1, 1, nq, nk).expand(b, hkv, nq, nk)
        keep = self.masks.get(module.layer_idx)
        if keep is not None:
            full = torch.ones(b, hkv, nk, dtype=torch.bool)
            full[:, :, : keep.shape[-1]] = keep
            allowed = allowed & full.unsqueeze(2)
        k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed.repeat_interleave(g, 1),
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None


def perplexity(model, prompt_kv, ids_cont, picks=None, wrapper=None) -> float:
    """PPL of ids_cont (1, P) after the prompt whose K/V are prompt_kv, with picks' encodings/masks if given."""
    from transformers import DynamicCache

    cache = DynamicCache()
    wrapper.masks.clear()
    for layer, (k, v) in enumerate(prompt_kv):
        k, v = k.clone(), v.clone()
        if picks is not None:
            c = picks[layer]
            lo, hi = c["lo"], c["hi"]
            k[:, :, lo:hi], v[:, :, lo:hi] = c["k_rec"], c["v_rec"]
            if c["keep"] < 1:
                wrapper.masks[layer] = c["mask"]
        cache.update(k, v, layer)
    with torch.no_grad():
        logits = model(input_ids=ids_cont, past_key_values=cache, use_cache=True).logits
    # the prompt's last token predicts ids_cont[0]; we score ids_cont[1:] from the continuation's own logits
    nll = F.cross_entropy(logits[0, :-1].float(), ids_cont[0, 1:])
    return float(nll.exp())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--obs", type=int, default=32)
    ap.add_argument("--future", type=int, default=64)
    ap.add_argument("--ppl", type=int, default=256)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0, help="start token in the Britannica text")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers.modeling_utils import AttentionInterface

    from .. import load_model
    from ..eval.data import britannica_text, token_ids

    start = time.perf_counter()
    model, tok = load_model()
    need = args.offset + args.prompt + max(args.future, args.ppl)
    ids = token_ids(tok, britannica_text(), need, "the Britannica text")[args.offset:need].unsqueeze(0)
    adapter, captured, kv = capture(model, ids[:, : args.prompt + args.future])
    layers = []
    for layer in range(adapter.num_layers):
        hidden, pe = captured[layer]
        k, v = kv[layer]
        cands = layer_candidates(args, adapter, layer, hidden, pe, k, v)
        for c in cands:
            c["lo"], c["hi"] = args.sink, args.prompt - args.recent
        layers.append(cands)
    dyn_layer = 2 * kv[0][0][:, :, : args.prompt].numel() * kv[0][0].element_size()
    dynamic = dyn_layer * adapter.num_layers
    print(f"candidates scored in {time.perf_counter() - start:.0f} s; DynamicCache bytes {dynamic / 2**20:.1f} MiB "
          f"({dyn_layer / 2**20:.2f} MiB/layer)")

    print("\nPer-layer frontier (future error of the best candidate within a byte share of the layer's "
          "DynamicCache bytes; keep/K/V of that candidate):")
    shares = (1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32)
    print("layer " + " ".join(f"{'1/%d' % round(1 / s):>26}" for s in shares))
    for layer, cands in enumerate(layers):
        cells = []
        for s in shares:
            ok = [c for c in cands if c["bytes"] <= s * dyn_layer]
            if ok:
                c = min(ok, key=lambda c: c["future"])
                cells.append(f"{c['future']:.3f} {c['keep']:g}/{c['k']}/{c['v']}")
            else:
                cells.append("-")
        print(f"{layer:5d} " + " ".join(f"{x:>26}" for x in cells))

    wrapper = EvictingAttention()
    saved = AttentionInterface._global_mapping.get("sdpa")
    AttentionInterface._global_mapping["sdpa"] = wrapper
    model.config._attn_implementation = "sdpa"
    try:
        ids_cont = ids[:, args.prompt - 1: args.prompt + args.ppl]  # last prompt token + continuation
        prompt_kv = [(k[:, :, : args.prompt - 1], v[:, :, : args.prompt - 1]) for k, v in kv]
        # the cache must hold the prompt minus its last token, which is re-fed as the first continuation token
        for cands in layers:
            for c in cands:
                c["mask"] = c["mask"][:, :, : args.prompt - 1]
        base = perplexity(model, prompt_kv, ids_cont, None, wrapper)
        print(f"\nPPL of {args.ppl} continuation tokens with the exact prompt cache: {base:.3f}")
        print(f"{'budget':>7} {'select by':>9} {'bytes':>7} {'sum obs':>8} {'sum fut':>8} {'PPL':>8} {'dPPL':>7}  mix")
        for frac in (1 / 2, 1 / 4, 1 / 8, 1 / 16):
            budget = int(frac * dynamic)
            for measure in ("obs", "future"):
                groups = [[Option(c["bytes"], c[measure]) for c in cands] for cands in layers]
                try:
                    alloc = allocate(groups, budget)
                except ValueError as err:
                    print(f"{'1/%d' % round(1 / frac):>7} {measure:>9}  infeasible: {err}")
                    break
                picks = [layers[g][i] for g, i in enumerate(alloc.choice)]
                ppl = perplexity(model, prompt_kv, ids_cont, picks, wrapper)
                mix = Counter(f"{p['keep']:g}/{p['k']}/{p['v']}" for p in picks).most_common(4)
                print(f"{'1/%d' % round(1 / frac):>7} {measure:>9} {dynamic / alloc.nbytes:6.1f}x "
                      f"{sum(p['obs'] for p in picks):8.3f} {sum(p['future'] for p in picks):8.3f} {ppl:8.3f} "
                      f"{100 * (ppl / base - 1):+6.2f}%  " + ", ".join(f"{n}x {m}" for m, n in mix))
        for name, (keep, kc, vc) in {"KIVI-4 everywhere": (1.0, "q4", "q4"),
                                     "KIVI-2 everywhere": (1.0, "q2", "q2")}.items():
            picks = [next(c for c in cands if (c["keep"], c["k"], c["v"]) == (keep, kc, vc)) for cands in layers]
            held = sum(p["bytes"] for p in picks)
            ppl = perplexity(model, prompt_kv, ids_cont, picks, wrapper)
            print(f"{name:>17}: {dynamic / held:.1f}x smaller, PPL {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%)")
    finally:
        AttentionInterface._global_mapping["sdpa"] = saved
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
