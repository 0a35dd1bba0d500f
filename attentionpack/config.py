"""`PackConfig`: what the cache compresses and how, validated on construction, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

Codec = Literal["exact", "lowrank", "quant"]
CODECS = ("exact", "lowrank", "quant")
QUANT_BITS = (2, 4, 8)  # codec "quant": bits of the states themselves
BUDGET_CHUNK = 64  # generated tokens per decode chunk of a budget cache (`PackConfig.decode_chunk`)
FACTOR_BITS = (4, 8)  # codec "lowrank": optional bits of the coefficients (basis then 8-bit)
IMAGE_BASES = ("per_image", "shared")
KEY_OBJECTIVES = ("keys", "scores")
TAIL_DTYPES = ("model", "float16")  # `PackConfig.tail_dtype`: how the exact tail stores the newest tokens
# fields a modality (text, image, video tokens of a vision-language prompt) may set for itself
MODALITY_FIELDS = tuple(
    f"{p}_{n}"
    for p in ("key", "value")
    for n in ("codec", "rank", "rank_fraction", "energy", "max_rank_fraction", "bits")
)
# and what image and video tokens may set besides: eviction per image (or group of frames)
VISUAL_FIELDS = ("keep", "evicted_bits")


@dataclass(frozen=True)
class PackConfig:
    """How a `PackedCache` stores keys and values.

    The cache keeps, per layer and in position order: the first `sink` tokens exact, the prompt's spans compressed
    (each span its own basis), generated text compressed every `chunk` tokens, and the most recent `window` tokens
    exact. Keys are compressed before RoPE. `chunk` None (the default) is 64 with a `budget` and 256 otherwise
    (`decode_chunk`).

    Codecs per tensor: "exact"; "lowrank" (truncated SVD of all KV heads side by side; `*_bits` 8 or 4 also
    quantizes the factors); "quant" (KIVI-style: keys per channel, values per token, `*_bits` 8/4/2, groups of
    `*_group` elements, `quant_group` when None; low-rank coefficients are grouped along the tokens likewise).
    Rank rule for "lowrank", first set wins: `*_rank` (fixed), `*_rank_fraction` (of H_kv*d),
    `*_energy` (smallest rank capturing that share of the squared singular values). `*_max_rank_fraction`
    caps the energy rule. `key_pre_rope`: factor low-rank keys before RoPE (the most compressible form; keys are
    rebuilt and rotated when attended) or after it (attention runs on the factors without rebuilding keys: faster
    decoding, higher rank for the same error). `key_objective` (keys factored after RoPE): "keys" minimizes the
    keys' own squared error (rank by captured energy); "scores" minimizes the error of the attention scores under
    the prompt's own queries (the keys weighted by the second moment of each head's queries, rank by captured
    weighted energy; `codecs.lowrank.score_weighting`).

    `budget`: None, or a fraction f in (0, 1]: after every prefill the cache holds at most f x the bytes a
    DynamicCache holds for the same tokens while decoding (every storage counted; its sliding-window layers keep
    their last W-1 tokens). The prompt's spans then ignore the codec fields above: per layer and for keys and
    values separately, the cache picks among exact, 8/4/2-bit quantization (in groups of `quant_group` and of 128)
    and post-RoPE low-rank encodings the mix with the least attention-output error of the last prompt queries
    that fits (budget/planner.py); each layer's decode chunks use its chosen encoding (`*_group` included). Text
    prompts only. The prompt's last `window` tokens are weighed like the other spans (any candidate, as the
    error decides); only the sinks stay exact, so a very small f needs a long enough prompt (a BudgetError
    names the smallest feasible fraction). `budget_strict=False` makes f a target (the presets `balanced` and
    `max` are targets): the cache holds f x DynamicCache's bytes, or what the codec fields above would hold if that
    is more (short prompts, whose exact sinks and window weigh more), chosen where the errors are least; a prompt
    the budget cannot serve (image/video tokens, a cache filled by `ingest`) uses the codec fields. Never raises.
    `layer_weights`: the budget weighs each layer's errors by how much a unit of them moves the model's
    predictions there (`scoring.sensitivity`: a noise probe run once per model, ~15 s for a 135M model on 2 CPU
    cores, kept in a file); False weighs every layer alike.

    Per-head treatment (attention on the stored form only; text prompts). With `budget`, `keep` is the smallest
    share the budget may keep: every prompt span is also offered with 1/2, 1/4, ... of its tokens down to `keep`,
    chosen per (sample, head) by the prompt queries before the budget's judge (`budget/eviction.py`), and with
    `evicted_bits` the rest of such a span is demoted (stored at that many bits) instead of dropped;
    `retrieval_heads` does not combine with a budget yet. Without a budget:
    `retrieval_heads`: RazorAttention (arXiv 2407.15891): the share of (layer, KV head) pairs, found once per model
    by a repeated random-token probe (`scoring.retrieval_heads`), that keep every token in the codec fields' form;
    every other head keeps the sinks and the recent `window`, and each prompt span and decode chunk that leaves its
    window becomes one compensation token (the mean of its keys and of its values, weighted by how many tokens it
    stands for). `keep`: score-based eviction (SnapKV, arXiv 2404.14469): per sample and KV head, the share of each
    prompt span's tokens kept, ranked by the attention of the prompt's last `observation` queries (pooled over 7
    neighbours); sinks and window are kept. `evicted_bits` (2 or 4): demote, don't drop — the tokens not kept are
    stored at that many bits (keys per channel, values per token) instead of dropped. Sliding-window layers are
    not evicted (they hold their window only).

    `tail_dtype`: how the newest tokens (the exact tail, at most `window + chunk - 1` of them while decoding) are
    stored once the call that brought them has been compacted: "model" keeps the model's dtype; "float16" stores
    them, and every token later calls append, in half precision (a relative rounding of 2^-11; tokens beyond
    float16's range switch that tail to bfloat16, the same bytes) — half the tail's bytes for a float32 model, no
    change for a half-precision one. None (the default): "float16" for a compressing budget cache (a budget or
    the presets `balanced`/`max`), "model" otherwise, so `lossless` stays bit-exact. The first call's tokens are
    compressed from the model's own values either way (sinks stay exact).

    `compressed_attention`: compute attention directly on the stored form (attention/packed.py) when the model
    uses SDPA; otherwise keys/values are materialized for the model's own attention at every step.

    Vision-language prompts (see README "Vision-language models"): the compacted prompt is split per sample into
    modality groups — text, each image (or all images of a sample, `image_basis="shared"`), each group of
    `video_group_frames` video frames — each with its own basis. `text`, `image` and `video` override the codec
    fields above for that modality's tokens, e.g. `image={"key_energy": 0.9, "value_bits": 2}` or
    `text={"key_codec": "exact", "value_codec": "exact"}` (only images compressed). Allowed keys: MODALITY_FIELDS,
    and for image and video tokens VISUAL_FIELDS: `image={"keep": 0.25}` keeps, per sample, KV head and image
    (group of frames), the quarter of its tokens the prompt's last `observation` queries (its text, after the
    image) attend to most, in the image codec fields' form; `evicted_bits` demotes the rest instead of dropping
    them (as `keep` / `evicted_bits` do for text spans; not on sliding-window layers).
    """

    key_codec: Codec = "lowrank"
    key_rank: int | None = None
    key_rank_fraction: float | None = None
    key_energy: float | None = 0.99
    key_max_rank_fraction: float = 1.0
    key_bits: int | None = None
    key_group: int | None = None
    key_pre_rope: bool = True
    key_objective: Literal["keys", "scores"] = "keys"

    value_codec: Codec = "lowrank"
    value_rank: int | None = None
    value_rank_fraction: float | None = None
    value_energy: float | None = 0.99
    value_max_rank_fraction: float = 1.0
    value_bits: int | None = None
    value_group: int | None = None
    quant_group: int = 32

    compressed_attention: bool = True
    tail_dtype: Literal["model", "float16"] | None = None
    sink: int = 4
    window: int = 64
    chunk: int | None = None
    min_span: int = 32
    compress_sliding_layers: bool = True
    fallback_exact: bool = True
    image_basis: Literal["per_image", "shared"] = "per_image"
    video_group_frames: int = 4
    text: dict | None = None
    image: dict | None = None
    video: dict | None = None
    budget: float | None = None
    budget_strict: bool = True
    retrieval_heads: float | None = None
    keep: float | None = None
    evicted_bits: int | None = None
    observation: int = 32
    layer_weights: bool = True
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        for prefix in ("key", "value"):
            codec = getattr(self, f"{prefix}_codec")
            if codec not in CODECS:
                _bad(f"{prefix}_codec", codec, f"one of {CODECS}")
            rank = getattr(self, f"{prefix}_rank")
            if rank is not None and (not _is_int(rank) or rank < 1):
                _bad(f"{prefix}_rank", rank, "an integer >= 1 (or None)")
            frac = getattr(self, f"{prefix}_rank_fraction")
            if frac is not None and not (_is_num(frac) and 0 < frac <= 1):
                _bad(f"{prefix}_rank_fraction", frac, "a number in (0, 1] (or None)")
            energy = getattr(self, f"{prefix}_energy")
            if energy is not None and not (_is_num(energy) and 0 < energy <= 1):
                _bad(f"{prefix}_energy", energy, "a number in (0, 1] (or None)")
            cap = getattr(self, f"{prefix}_max_rank_fraction")
            if not (_is_num(cap) and 0 < cap <= 1):
                _bad(f"{prefix}_max_rank_fraction", cap, "a number in (0, 1]")
            if codec == "lowrank" and rank is None and frac is None and energy is None:
                _bad(f"{prefix}_energy", energy, f"set when {prefix}_codec='lowrank' and no rank is given")
            bits = getattr(self, f"{prefix}_bits")
            if bits is not None and not _is_int(bits):
                _bad(f"{prefix}_bits", bits, "an integer (8, 4 or 2) or None")
            if codec == "quant" and bits not in QUANT_BITS:
                _bad(f"{prefix}_bits", bits, f"one of {QUANT_BITS} when {prefix}_codec='quant'")
            if codec == "lowrank" and bits is not None and bits not in FACTOR_BITS:
                _bad(f"{prefix}_bits", bits, f"None or one of {FACTOR_BITS} when {prefix}_codec='lowrank'")
            if codec == "exact" and bits is not None:
                _bad(f"{prefix}_bits", bits, f"None when {prefix}_codec='exact'")
            group = getattr(self, f"{prefix}_group")
            if group is not None and (not _is_int(group) or group < 8):
                _bad(f"{prefix}_group", group, "an integer >= 8 (or None: quant_group)")
        for name, low in (("sink", 0), ("window", 0), ("chunk", 1), ("min_span", 1), ("quant_group", 8)):
            value = getattr(self, name)
            if name == "chunk" and value is None:
                continue
            if not _is_int(value) or value < low:
                _bad(name, value, f"an integer >= {low}" + (" (or None)" if name == "chunk" else ""))
        for name in (
            "key_pre_rope",
            "compressed_attention",
            "compress_sliding_layers",
            "fallback_exact",
            "budget_strict",
        ):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "True or False")
        if self.tail_dtype is not None and self.tail_dtype not in TAIL_DTYPES:
            _bad("tail_dtype", self.tail_dtype, f"None or one of {TAIL_DTYPES}")
        if self.key_objective not in KEY_OBJECTIVES:
            _bad("key_objective", self.key_objective, f"one of {KEY_OBJECTIVES}")
        if self.image_basis not in IMAGE_BASES:
            _bad("image_basis", self.image_basis, f"one of {IMAGE_BASES}")
        if not _is_int(self.video_group_frames) or self.video_group_frames < 1:
            _bad("video_group_frames", self.video_group_frames, "an integer >= 1")
        if self.budget is not None:
            if not (_is_num(self.budget) and 0 < self.budget <= 1):
                _bad("budget", self.budget, "None or a fraction of DynamicCache's bytes in (0, 1], e.g. 0.125")
            # a target budget (budget_strict=False) leaves image/video prompts to the codec fields: overrides apply
            if self.budget_strict and any(getattr(self, m) for m in ("text", "image", "video")):
                _bad(
                    "budget",
                    self.budget,
                    "None when modality overrides (text, image, video) are set: a budget "
                    "chooses the encodings of text prompts itself (or budget_strict=False, where the "
                    "overrides serve the prompts the budget leaves to the codec fields)",
                )
        if self.retrieval_heads is not None and not (_is_num(self.retrieval_heads) and 0 <= self.retrieval_heads <= 1):
            _bad("retrieval_heads", self.retrieval_heads, "None or a share of KV heads in [0, 1], e.g. 0.15")
        if self.keep is not None and not (_is_num(self.keep) and 0 < self.keep <= 1):
            _bad("keep", self.keep, "None or a share of each span's tokens in (0, 1], e.g. 0.25")
        if self.evicted_bits is not None and (self.evicted_bits not in (2, 4) or not _is_int(self.evicted_bits)):
            _bad(
                "evicted_bits", self.evicted_bits, "None (drop) or 2 or 4 (store the evicted tokens at that many bits)"
            )
        if self.evicted_bits is not None and self.keep is None:
            _bad("evicted_bits", self.evicted_bits, "None unless keep is set (it stores the tokens keep evicts)")
        if not isinstance(self.layer_weights, bool):
            _bad("layer_weights", self.layer_weights, "True or False")
        if not _is_int(self.observation) or self.observation < 1:
            _bad("observation", self.observation, "an integer >= 1")
        if self.budget is not None and self.retrieval_heads is not None:
            _bad(
                "budget",
                self.budget,
                "None when retrieval_heads is set: a budget chooses eviction and demotion (keep: the smallest "
                "share it may keep, evicted_bits: the demoted tokens' bits) but not yet retrieval-head splits",
            )
        if self.per_head and not self.compressed_attention:
            _bad(
                "compressed_attention", False, "True when retrieval_heads or keep is set (heads keep different tokens)"
            )
        for modality in ("text", "image", "video"):
            overrides = getattr(self, modality)
            if overrides is None:
                continue
            allowed = MODALITY_FIELDS + (VISUAL_FIELDS if modality != "text" else ())
            if not isinstance(overrides, dict) or any(k not in allowed for k in overrides):
                _bad(modality, overrides, f"None or a dict with keys among {allowed}")
            object.__setattr__(self, modality, dict(overrides))  # a private copy: later edits cannot bypass checks
            try:
                self.for_modality(modality)
            except ValueError as err:
                _bad(modality, overrides, f"valid codec settings for {modality} tokens ({err})")
        if self.tail_dtype == "float16" and self.is_lossless:
            _bad("tail_dtype", self.tail_dtype, "None or 'model' when nothing is compressed (lossless stays exact)")

    def for_modality(self, modality: str) -> PackConfig:
        """The codec settings for `modality` ("text", "image", "video") tokens: this config with its overrides."""
        overrides = getattr(self, modality) if modality in ("text", "image", "video") else None
        if not overrides:
            return self
        # a budget never chooses image or video encodings (it declines those prompts or refuses them)
        budget = self.budget if modality == "text" else None
        return dataclasses.replace(self, text=None, image=None, video=None, budget=budget, **overrides)

    def group(self, is_key: bool) -> int:
        """Quantization group size of keys (or values, and their low-rank coefficients): `*_group` or quant_group."""
        group = self.key_group if is_key else self.value_group
        return self.quant_group if group is None else group

    @property
    def decode_chunk(self) -> int:
        """Generated tokens per decode chunk: `chunk`, or by default BUDGET_CHUNK (64) with a budget and 256 without. A
        budget's chunk encodings (2/4/8-bit codes; a low-rank choice's chunks at 4 bits, see `budget.candidate_config`)
        stay well below exact bytes for 64 tokens, and generated tokens then leave the exact tail 4x sooner (measured:
        SmolLM2 budget=1/8 holds 5.7x less than DynamicCache after 256 generated tokens instead of 4.5x, Gemma 3 3.4x
        instead of 2.3x; README "Presets, measured"); a fixed low-rank codec needs longer chunks to beat its own
        basis."""
        if self.chunk is not None:
            return self.chunk
        return BUDGET_CHUNK if self.budget is not None else 256

    @property
    def half_tail(self) -> bool:
        """The exact tail stores its tokens in half precision after their first call (`tail_dtype`)."""
        if self.tail_dtype is not None:
            return self.tail_dtype == "float16"
        return self.budget is not None

    @property
    def per_head(self) -> bool:
        """Heads or tokens are treated apart: retrieval heads, eviction (of text, images or video frames)."""
        return self.retrieval_heads is not None or self.evicts

    @property
    def evicts(self) -> bool:
        """Some tokens are kept by importance: `keep` (text spans) or an image/video override's `keep`."""
        return self.keep is not None or self.evicts_visual

    @property
    def evicts_visual(self) -> bool:
        """An image or video override sets `keep`: those tokens are kept by the attention the prompt gives them."""
        return any(isinstance(o, dict) and o.get("keep") is not None for o in (self.image, self.video))

    @property
    def is_lossless(self) -> bool:
        """No modality's keys or values are ever encoded or dropped."""
        return (
            self.budget is None
            and not self.per_head
            and all(
                c.key_codec == "exact" and c.value_codec == "exact"
                for c in (self.for_modality(m) for m in ("text", "image", "video"))
            )
        )

    def replace(self, **changes: Any) -> PackConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown PackConfig field(s) {sorted(unknown)}; fields: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> PackConfig:
        """A named, measured configuration: see `PRESETS` (README lists their measured trade-offs)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name], name=name)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _bad(field_name: str, value: object, allowed: str) -> NoReturn:
    raise ValueError(f"PackConfig.{field_name}={value!r} is invalid: must be {allowed}")


# `balanced` and `max` are byte targets chosen per model, layer and prompt from measured attention errors (a
# target budget: 1/5 and about 1/6.7 of DynamicCache's bytes after the prefill, README "Presets, measured"); their
# codec fields (keys: low-rank factors of the rotated keys with 4-bit coefficients; values: 4-bit per token) serve
# the prompts a budget cannot (image/video tokens, `ingest`) and the generated tokens' chunks until a prefill chose.
_TARGET = dict(
    budget_strict=False, key_bits=4, key_pre_rope=False, value_codec="quant", value_bits=4, value_energy=None
)
PRESETS: dict[str, dict] = {
    "lossless": dict(key_codec="exact", value_codec="exact", key_energy=None, value_energy=None),
    "balanced": dict(_TARGET, budget=0.2, key_energy=0.98),
    "max": dict(_TARGET, budget=0.15, key_energy=0.95),
    # RazorAttention alone: retrieval heads exact and whole (the paper protects 15% of heads), the other heads the
    # sinks, the 512 newest tokens (+ up to 64 decoded ones) and one compensation token per span or 64-token chunk
    "razor": dict(
        key_codec="exact",
        value_codec="exact",
        key_energy=None,
        value_energy=None,
        retrieval_heads=0.15,
        window=512,
        chunk=64,
    ),
}
