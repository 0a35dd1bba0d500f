"""`attentionpack bench vlm`: bytes held per modality vs DynamicCache on a tiny random LLaVA, 1 / 4 / 16 images.

The model (bench/tiny_vlm.py, random weights) only supplies realistic cache shapes: 2 layers, 2 KV heads x 16
(D = 32), fp32, `tokens` image tokens per image. Image groups are stored at a fixed rank r with fp32 factors, so
their bytes follow from arithmetic alone; per layer and per image group of m token slots (batch 1):

    keys   m·r·4 (coefficients) + r·D·4 (basis) [+ m·4 int32 positions when keys are factored before RoPE]
    values m·r·4 + r·D·4
    layout m·8 (int64 cache indices) + m (valid flags), stored once for all layers

against 2·m·D·4 per layer for DynamicCache (a group shorter than `min_span` is kept exact: 2·m·D·4 too). With
one basis per image the image ratio is the same for any number of images; with a shared basis the r·D basis cost
is paid once, so the ratio rises toward 2D / (2r + 1) as images are added. The whole cache's ratio grows with
the number of images either way, since text, sinks and the recent window are a fixed cost.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from .. import PackConfig, PackedCache
from .tiny_vlm import tiny_llava

IMAGE_COUNTS = (1, 4, 16)


def bench_config(rank: int, basis: str) -> PackConfig:
    """The preset "balanced" for text; images at a fixed rank with fp32 factors, never replaced by exact states
    (`fallback_exact=False`), so the image bytes are exactly the arithmetic."""
    image = {"key_rank": rank, "key_bits": None, "value_codec": "lowrank", "value_rank": rank, "value_bits": None}
    return PackConfig.preset("balanced").replace(
        image=image, image_basis=basis, fallback_exact=False, name=f"balanced, images r={rank}"
    )


def prompt_ids(images: int, image_id: int, tokens: int, text: int = 48, seed: int = 0) -> torch.Tensor:
    """(1, T) ids: `text` tokens of instructions, then every image followed by 6 text tokens, then a question of
    80 tokens (longer than the recent window, so every image is compacted)."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: torch.randint(0, 256, (n,), generator=gen).tolist()  # noqa: E731
    ids = [257] + words(text)
    for _ in range(images):
        ids += [image_id] * tokens + words(6)
    return torch.tensor([ids + words(80)])


def image_arithmetic(cache: PackedCache, rank: int) -> int:
    """Bytes the image groups must hold by the formula in the module docstring, from their slot counts only."""
    spec = cache.adapter.layers[0]
    dim, total, layouts = spec.num_kv_heads * spec.head_dim, 0, set()
    for layer in cache.layers:
        for seg in layer.segments:
            if seg.modality != "image" or seg.index is None or seg.valid is None:
                continue
            b, m = seg.index.shape
            r = min(rank, dim)
            if int(seg.valid.sum(dim=1).max()) < cache.config.min_span:  # too short to factor: kept exact
                total += b * 2 * m * dim * 4
            else:
                positions = m * 4 if cache.config.key_pre_rope else 0  # to re-rotate pre-RoPE keys
                total += b * (2 * (m * r * 4 + r * dim * 4) + positions)
            if seg.group not in layouts:  # one layout per group, shared by the layers
                layouts.add(seg.group)
                total += b * m * 9
    return total


@torch.inference_mode()
def run(image_counts=IMAGE_COUNTS, rank: int = 8, image_size: int = 64, console: Console | None = None) -> list[dict]:
    """Prefill prompts with 1, 4, 16 images under both image bases; print and return one row per modality."""
    console = console or Console()
    model, image_id, tokens = tiny_llava(image_size)
    rows = []
    for basis in ("per_image", "shared"):
        table = Table(
            title=f"Tiny random LLaVA ({tokens} tokens per image), image_basis={basis!r}, images at "
            f"rank {rank} (D=32), text 'balanced': bytes held after prefill"
        )
        for col in ("images", "modality", "entries", "bytes held", "DynamicCache bytes", "ratio", "arithmetic"):
            table.add_column(col, justify="left" if col == "modality" else "right")
        for n in image_counts:
            ids = prompt_ids(n, image_id, tokens)
            pixels = torch.randn(n, 3, image_size, image_size, generator=torch.Generator().manual_seed(n))
            cache = PackedCache(model, bench_config(rank, basis))
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, past_key_values=cache)
            dynamic = DynamicCache(config=model.config.text_config)
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, past_key_values=dynamic)
            stats = cache.stats()
            expected = image_arithmetic(cache, rank)
            for name, m in sorted(stats["modalities"].items()):
                arithmetic = f"{expected:,}" if name == "image" else ""
                table.add_row(
                    str(n),
                    name,
                    f"{m['entries']:,}",
                    f"{m['bytes']:,}",
                    f"{m['dynamic_bytes']:,}",
                    f"{m['ratio']:.2f}x",
                    arithmetic,
                )
                rows.append(
                    {
                        "images": n,
                        "basis": basis,
                        "modality": name,
                        **m,
                        "arithmetic": expected if name == "image" else None,
                    }
                )
            table.add_row(
                str(n),
                "[b]all[/b]",
                f"{sum(m['entries'] for m in stats['modalities'].values()):,}",
                f"{stats['bytes']:,}",
                f"{stats['dynamic_bytes']:,}",
                f"{stats['ratio']:.2f}x",
                "",
                end_section=True,
            )
            rows.append(
                {
                    "images": n,
                    "basis": basis,
                    "modality": "all",
                    "bytes": stats["bytes"],
                    "dynamic_bytes": stats["dynamic_bytes"],
                    "ratio": stats["ratio"],
                    "real_dynamic_bytes": _dynamic_bytes(dynamic),
                }
            )
        console.print(table)
    console.print(
        "Outputs of this random model are meaningless; only the cache shapes matter. 'exact' = sinks and "
        "the recent window; 'arithmetic' = the image bytes the factor shapes require."
    )
    return rows


def _dynamic_bytes(cache: DynamicCache) -> int:
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    return sum(t.untyped_storage().nbytes() for t in tensors if isinstance(t, torch.Tensor))
