"""Half-precision end to end on the embedded SmolLM2-135M-Instruct: the README's question in float16 and
bfloat16, DynamicCache's 64 greedy tokens teacher-forced through `balanced`, `max` and `PackConfig(budget=0.25)`
(fused kernels on): every logit finite, and the compressed caches pick DynamicCache's token at almost every step.
(float16 queries used to be read as float32 bytes by the kernels: NaN logits and "Sh" + end-of-text; a budget
crashed on any half-precision model.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from attentionpack import PackConfig, PackedCache, load_model
from attentionpack.generation import encode_prompt

pytestmark = pytest.mark.real_model

NEW = 64
QUESTION = Path(__file__).resolve().parents[1] / "examples" / "shakespeare_question.txt"
CONFIGS = {"balanced": "balanced", "max": "max", "budget-0.25": PackConfig(budget=0.25)}
# top-1 agreement with DynamicCache over the 64 teacher-forced steps. Lossy caches need not reproduce all 64 greedy
# tokens (in float32 `balanced` and `max` do not either; tests/test_real_model.py asks > 0.5 of them there); the
# float16 kernel bug gave NaN logits from the first step on. Measured 2026-11-30: bfloat16 balanced and max 57/64
MIN_AGREEMENT = 0.85
SLOW = os.environ.get("ATTENTIONPACK_SLOW_TESTS", "0") not in ("", "0")  # make test-slow


@pytest.fixture(scope="module", params=[torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def half(request):
    """(model, prompt ids, DynamicCache's greedy tokens) in one half-precision dtype."""
    model, tokenizer = load_model(dtype=request.param)
    ids = encode_prompt(tokenizer, QUESTION.read_text(encoding="utf-8"), chat=True)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            past_key_values=DynamicCache(config=model.config),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert all(torch.isfinite(x).all() for x in out.logits)
    return model, ids, out.sequences[:, ids.shape[1] :]


def _teacher_forced(model, cache, ids, tokens) -> torch.Tensor:
    """Logits (NEW, V) of the prefill's last position and of every step fed DynamicCache's tokens."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache)
        logits.append(out.logits[0, -1])
        mask = torch.ones_like(ids)
        for t in range(NEW - 1):
            mask = torch.cat([mask, mask[:, :1]], dim=1)
            out = model(input_ids=tokens[:, t : t + 1], attention_mask=mask, past_key_values=cache)
            logits.append(out.logits[0, -1])
    return torch.stack(logits).float()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_half_precision_presets_and_budget_follow_dynamic_cache(half, config, request):
    dtype = request.node.callspec.id.split("-")[0]
    if (dtype, config) not in (("float16", "balanced"), ("bfloat16", "budget-0.25")) and not SLOW:
        pytest.skip("the other half-precision combinations take minutes each on CPU: ATTENTIONPACK_SLOW_TESTS=1")
    model, ids, tokens = half
    cache = PackedCache(model, CONFIGS[config])
    logits = _teacher_forced(model, cache, ids, tokens)
    assert torch.isfinite(logits).all(), "non-finite logits"
    assert cache.nbytes() < cache.dynamic_nbytes()
    picked = logits.argmax(-1)
    assert picked[0] == tokens[0, 0], "the first answer token differs from DynamicCache's"
    agreement = (picked == tokens[0]).float().mean().item()
    print(
        f"{config} {model.dtype}: top-1 agreement {agreement:.3f}, {cache.nbytes():,} bytes vs "
        f"{cache.dynamic_nbytes():,}"
    )
    assert agreement >= MIN_AGREEMENT, f"{config} {model.dtype}: top-1 agreement {agreement:.3f} with DynamicCache"
