"""The candidate encodings a byte budget chooses among (`budget/planner.py`): per tensor exact, KIVI quantization at
8/4/2 bits (keys per channel, values per token) and low-rank post-RoPE factors with 4-bit coefficients at several
energies (values: 95% and below); each encoded for real, so its bytes are those of its storages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..codecs import energy_ranks, spectrum_and_basis
from ..codecs.lowrank import score_weighting
from ..config import PackConfig
from ..kernels import ops
from ..kernels.ops import quantize_groups, quantize_widths
from ..parts import (
    ExactPart,
    Factors,
    Part,
    Quantized,
    QuantizedLowRankPart,
    QuantizedPart,
    Segment,
    dequantize_native,
    storage_nbytes,
)

# candidate encodings: label -> codec fields for one tensor; low-rank keys post-RoPE. Quantization at the config's
# group size (`quant_group`, "q4") and in groups of WIDE_GROUP ("q4g128"): a group's float16 scale and minimum cost
# 1 bit per element at 32 (a 2-bit code costs 3) and 0.25 at 128, where a wider group's range costs error instead.
# 8-bit codes gain least (8.25 bits against 9) but matter: the recent window's 8-bit form frees bytes for older
# tokens (without "q8g128", Gemma 3 1/8 on a prose window: +3.04% instead of +0.53%, docs/eval/wide-groups-*.md)
WIDE_GROUP = 128
_QUANT = {
    f"q{b}{'' if g is None else f'g{g}'}": dict(codec="quant", bits=b, group=g)
    for b in (8, 4, 2)
    for g in (None, WIDE_GROUP)
}
_LOWRANK = {
    f"lr{e:g}c{b}": dict(codec="lowrank", energy=e, bits=b)
    for e, b in ((0.98, 4), (0.95, 4), (0.9, 4), (0.8, 4), (0.6, 4))
}
KEY_CANDIDATES: dict[str, dict[str, Any]] = {"exact": dict(codec="exact"), **_QUANT, **_LOWRANK}
VALUE_CANDIDATES: dict[str, dict[str, Any]] = {
    "exact": dict(codec="exact"),
    **_QUANT,
    **{k: v for k, v in _LOWRANK.items() if float(v["energy"]) <= 0.95},  # type: ignore[arg-type]
}


def candidate_config(base: PackConfig, key: str, value: str) -> PackConfig:
    """`base` with the codec fields of key candidate `key` and value candidate `value`: the layer's codec for its
    decode chunks. A low-rank candidate's chunks are stored quantized at its coefficients' bits (in `base`'s
    group) instead: a 64-token chunk pays a whole (H*d)-wide basis for few tokens. Measured on SmolLM2, budget=1/8,
    4,096-token prompt, the next five chunks of every low-rank layer (75 tensors): factors at the layer's energy
    took ranks 10-41 of 64 (4.2-17.4 KB against 7.7 KB at 4 bits) with relative error 0.34 on average against
    0.07, larger in all 75; and the serving reservation bounds factor chunks at full rank."""
    fields = {}
    for prefix, spec in (("key", KEY_CANDIDATES[key]), ("value", VALUE_CANDIDATES[value])):
        if spec["codec"] == "lowrank":
            spec = dict(codec="quant", bits=spec["bits"])
        fields.update(
            {
                f"{prefix}_codec": spec["codec"],
                f"{prefix}_bits": spec.get("bits"),
                # None: the config's own group, which the candidate was quantized in (a user's *_group kept)
                f"{prefix}_group": spec.get("group") or getattr(base, f"{prefix}_group"),
                f"{prefix}_energy": spec.get("energy"),
                f"{prefix}_rank": None,
                f"{prefix}_rank_fraction": None,
                f"{prefix}_max_rank_fraction": 1.0,
            }
        )
    return base.replace(key_pre_rope=False, **fields)


def encode_candidates(
    x: torch.Tensor,
    is_key: bool,
    table: dict[str, dict[str, Any]],
    cfg: PackConfig,
    query_moments: torch.Tensor | None = None,
) -> list[tuple[str, Part]]:
    """(label, part) of every candidate of x (B, H, n, d), padding rows zeroed; encodings not smaller than
    exact are left out (exact itself is a candidate). Low-rank candidates share one factorization."""
    exact_bytes = x.numel() * x.element_size()
    out: list[tuple[str, Part]] = [("exact", ExactPart(x.clone()))]
    b, h, n, d = x.shape
    # factors of a span shorter than its width (H*d) hold little less than its states: quantization only
    lowrank = [(lab, s) for lab, s in table.items() if s["codec"] == "lowrank" and n >= h * d]
    if lowrank:
        block = x.transpose(1, 2).reshape(b, n, h * d)  # (B, T, H*d)
        weighting = score_weighting(query_moments).to(x.dtype) if query_moments is not None else None
        # float32 Gram and eigenvectors: the candidates keep <= 98% of the energy, far above their round-off
        # (~1e-7 of the total); a float64 solve took 1.8 ms instead of 1.3 per 192-wide block here (SmolLM2's
        # 60 per prefill)
        f32 = torch.float32
        spectrum, vecs = spectrum_and_basis(block, f32, f32)  # ranks from the keys' own energy
        seen = block
        if weighting is not None:  # which directions: those the prompt's queries see (codecs.lowrank.factorize)
            seen = block @ weighting
            _, vecs = spectrum_and_basis(seen, f32, f32)
        per_sample = [energy_ranks(spectrum[i], [s["energy"] for _, s in lowrank]) for i in range(b)]
        ranks = {lab: [r[j] for r in per_sample] for j, (lab, _) in enumerate(lowrank)}
        top = max(max(r) for r in ranks.values())
        basis = vecs[:, :, :top].to(x.dtype)  # (B, D, top)
        right = basis.transpose(1, 2)  # (B, top, D)
        if weighting is not None:  # basis = V_rᵀ L⁻¹ (see codecs.lowrank.factorize)
            right = torch.linalg.solve_triangular(weighting, right, upper=False, left=False)
        f = Factors(seen @ basis, right.contiguous())  # (B, T, top), (B, top, D)
        # coefficients are quantized per column (groups along T): the first r columns of the top-rank
        # encoding are exactly the rank-r encoding, so each bit width is quantized once
        coeffs = quantize_widths(f.coeffs, tuple({s["bits"] for _, s in lowrank}), cfg.group(is_key), axis=1)
        basis16 = f.basis.to(torch.float16)  # as QuantizedLowRankPart.from_factors(..., basis_bits=16) stores it
        full = {bits: QuantizedLowRankPart(q, basis16, h, None, ()) for bits, q in coeffs.items()}
    own, length = cfg.group(is_key), n if is_key else d  # keys' groups run along the tokens, values' along d
    quant = {  # a wide group that is no wider than the config's own here repeats it: left out
        lab: s
        for lab, s in table.items()
        if s["codec"] == "quant" and (s["group"] is None or min(s["group"], length) > min(own, length))
    }
    sizes = {s["group"]: own if s["group"] is None else s["group"] for s in quant.values()}  # None: own
    widths = {size: tuple({s["bits"] for s in quant.values() if sizes[s["group"]] == size}) for size in sizes.values()}
    by_size = quantize_groups(x, widths, axis=2 if is_key else 3) if widths else {}
    quantized = {group: by_size[size] for group, size in sizes.items()}  # group (None: own) -> bits -> x quantized
    for label, spec in table.items():
        part: Part
        if label in quant:
            part = QuantizedPart(quantized[spec["group"]][spec["bits"]])  # keys per channel, values per token
        elif spec["codec"] == "lowrank" and lowrank:
            part = first_components(full[spec["bits"]], max(ranks[label]), tuple(ranks[label]))
        else:
            continue
        if storage_nbytes(part.tensors()) < exact_bytes:
            out.append((label, part))
    return out


def codec_labels(config: PackConfig, segment: Segment | None) -> tuple[str, str]:
    """The (key, value) candidate labels that store a span as `config`'s codec fields would (exact where no
    candidate matches them, and for the recent window, which fixed codecs keep exact)."""
    if segment is None or segment.kind == "window":
        return "exact", "exact"
    labels = []
    for prefix, table in (("key", KEY_CANDIDATES), ("value", VALUE_CANDIDATES)):
        codec, bits, energy, group = (getattr(config, f"{prefix}_{n}") for n in ("codec", "bits", "energy", "group"))
        if prefix == "key" and codec == "lowrank" and config.key_pre_rope:
            codec = "pre-rope"  # not among the candidates (they factor rotated keys)
        want = {"codec": codec, "bits": bits} | (
            {"energy": energy} if codec == "lowrank" else {"group": group if group == WIDE_GROUP else None}
        )
        match = [lab for lab, spec in table.items() if all(spec.get(k) == v for k, v in want.items())]
        labels.append(match[0] if match and codec != "exact" else "exact")
    return labels[0], labels[1]


def first_components(part: QuantizedLowRankPart, r: int, sample_ranks: tuple[int, ...]) -> QuantizedLowRankPart:
    """The rank-r part made of the first r components of `part` (own storages, so bytes count exactly)."""
    q = part.coeffs  # stored (B, top, ...): one row per component
    coeffs = dataclasses.replace(
        q,
        codes=q.codes[:, :r].clone(),
        scales=q.scales[:, :r].clone(),
        mins=q.mins[:, :r].clone(),
        shape=(q.shape[0], q.shape[1], r),
    )
    basis = part.basis
    assert not isinstance(basis, Quantized), "budget candidates keep a float16 basis"
    return QuantizedLowRankPart(coeffs, basis[:, :r].clone(), part.num_heads, None, sample_ranks)


Family = list[tuple[str, QuantizedLowRankPart]]  # low-rank candidates of one coefficient width, by rank


def _families(parts: list[tuple[str, Part]]) -> tuple[list[tuple[str, Part]], list[Family]]:
    """Split candidates into (the others, low-rank families): the low-rank candidates of one coefficient width are
    the first components of one factorization (`encode_candidates`), each family sorted by rank."""
    others: list[tuple[str, Part]] = []
    families: dict[int, Family] = {}
    for label, part in parts:
        if isinstance(part, QuantizedLowRankPart) and part.positions is None and not isinstance(part.basis, Quantized):
            families.setdefault(part.coeffs.bits, []).append((label, part))
        else:
            others.append((label, part))
    return others, [sorted(f, key=lambda lp: lp[1].coeffs.shape[2]) for f in families.values()]


def _family_top(family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest member's coefficients (B, R, T) and basis per head (B, H, R, d), float32: every member's are
    their first rows."""
    top = family[-1][1]
    coeffs = dequantize_native(top.coeffs, torch.float32)  # (B, R, T)
    basis = top.basis
    assert isinstance(basis, torch.Tensor), "a family keeps a float basis (`_families`)"
    b, r, _ = basis.shape
    return coeffs, basis.float().view(b, r, top.num_heads, -1).transpose(1, 2)  # (B, H, R, d)


def candidate_scores(
    keys: list[tuple[str, Part]], q: torch.Tensor, start: int, end: int, block: int
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The logits of the query rows q (B, H, M, d) float32 against every key candidate but exact, `block` candidates
    at a time: (labels, logits (B, H, K, M, n) float32), K <= block, each candidate's scores written straight into
    its slot of one buffer, which the next chunk reuses (the caller may change a chunk in place). A low-rank family
    meets q once: qt = q @ basis (B, H, M, R) with the largest's R, then the logits grow component by component,
    rank r's being the previous member's plus components r'..r (`ops.scores` would read the T coefficients once per
    candidate); a family's first member in a chunk is summed from component 0."""
    others, families = _families([(label, part) for label, part in keys if label != "exact"])
    items: list[tuple[str, Part, tuple[torch.Tensor, torch.Tensor] | None]] = [(lab, p, None) for lab, p in others]
    for family in families:
        coeffs, per_head = _family_top(family)
        qt = q.float() @ per_head.transpose(-1, -2)  # (B, H, M, R)
        shared = (qt, coeffs)  # one object per family: members of the same family are told apart by identity
        items += [(label, part, shared) for label, part in family]
    if not items:
        return
    b, h, m = q.shape[:3]
    buf = torch.empty(b, h, min(block, len(items)), m, end - start, dtype=torch.float32, device=q.device)
    for c0 in range(0, len(items), block):
        chunk = items[c0 : c0 + block]
        logits = buf[:, :, : len(chunk)]  # (B, H, K, M, n)
        before: tuple[object, int, torch.Tensor] | None = None  # (family, rank, slot) of the previous slot
        for i, (_, part, fam) in enumerate(chunk):
            slot = logits[:, :, i]  # (B, H, M, n)
            if fam is None:
                ops.scores(part, q, start, end, None, out=slot)
                before = None
                continue
            assert isinstance(part, QuantizedLowRankPart), "a family holds low-rank candidates (`_families`)"
            qt, coeffs = fam
            rank = part.coeffs.shape[2]
            done = before[1] if before is not None and before[0] is fam else 0
            torch.matmul(qt[..., done:rank], coeffs[:, None, done:rank], out=slot)
            if done:
                slot.add_(before[2])  # type: ignore[index]
            before = (fam, rank, slot)
        yield [label for label, _, _ in chunk], logits


def candidate_mixes(values: list[tuple[str, Part]], p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights' mix p (B, H, M, T) of every value candidate but exact -> {label: (B, H, M, d) float32}. A
    low-rank family (`candidate_scores`) meets p once: y = p @ C (B, H, M, R) with the largest's R, then candidate r
    is y[..., :r] @ its basis rows (`ops.mix` would read the T coefficients once per candidate)."""
    others, families = _families([(label, part) for label, part in values if label != "exact"])
    out = {label: ops.mix(part, p).float() for label, part in others}
    for family in families:
        coeffs, per_head = _family_top(family)
        y = p.float() @ coeffs.transpose(1, 2).unsqueeze(1)  # (B, H, M, R)
        for label, part in family:
            rank = part.coeffs.shape[2]
            out[label] = y[..., :rank] @ per_head[:, :, :rank]
    return out
