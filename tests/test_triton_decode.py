"""The Triton decoding step (kernels/triton_decode.py): per-head segments with slots against float64, the merge of
blocks, the forms it names as not taken, a model decoding through it as through the C step, and on a GPU a model
and its caches on CUDA (every stored form, dtypes, masks and softcap: tests/test_fused_decode.py, both backends).
Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets before
anything imports Triton); with one, on CUDA tensors."""

from __future__ import annotations

import pytest
import torch
from decode_cases import DEVICE, B, D, G, H, Piece, keys, layer_pieces, triton_step, values

from attentionpack.config import PRESETS
from attentionpack.kernels import triton_decode
from attentionpack.parts import ExactPart, Segment

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'attentionpack[gpu]')")


def test_per_head_segment_with_slots():
    """A segment holding KV head 1 only, with slots' log multiplicities (-inf: empty): its tokens count
    exp(slot) times for head 1 and not at all for head 0; the cache mask is not read for it."""
    gen = torch.Generator().manual_seed(5)
    sink = Piece(keys("exact", gen, 4), values("exact", gen, 4), 0, 4)
    k1, v1 = torch.randn(B, 1, 70, D, generator=gen), torch.randn(B, 1, 70, D, generator=gen)
    slots = torch.log(torch.randint(1, 4, (B, 1, 70), generator=gen).half())
    slots[0, 0, 60:] = float("-inf")
    held = Segment(4, 74, ExactPart(k1), ExactPart(v1), "span", heads=(1,), slots=slots)
    tail = Piece(keys("exact", gen, 9), values("exact", gen, 9), 74, 83)
    query = torch.randn(B, H * G, 1, D, generator=gen)
    allowed = torch.ones(B, 1, 1, 83, dtype=torch.bool)
    allowed[2, ..., 20:40] = False  # inside the slot segment's cache range: not read for it
    got = triton_step([sink, held, tail], 0, query, allowed, 0.25, None)

    qg = query.double().view(B, H, G, D) * 0.25
    for h in range(H):
        ks = [sink.keys.data[:, h], tail.keys.data[:, h]]
        vs = [sink.values.data[:, h], tail.values.data[:, h]]
        s = torch.cat([qg[:, h] @ k.double().transpose(-1, -2) for k in ks], -1)  # (B, G, 13)
        v = torch.cat([x.double() for x in vs], 1)
        if h == 1:
            s = torch.cat(
                [s[..., :4], qg[:, h] @ k1[:, 0].double().transpose(-1, -2) + slots[:, 0, None].double(), s[..., 4:]],
                -1,
            )
            v = torch.cat([v[:, :4], v1[:, 0].double(), v[:, 4:]], 1)
        want = torch.softmax(s, -1) @ v  # (B, G, D)
        torch.testing.assert_close(got[:, 0, h * G : (h + 1) * G], want.float(), atol=2e-5, rtol=1e-4)


def test_merge_of_blocks_equals_one_softmax():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 200, generator=gen, dtype=torch.float64) * 4  # logits of 200 tokens
    v = torch.randn(2, 3, 200, 5, generator=gen, dtype=torch.float64)
    s[0, 1, :] = float("-inf")  # a row with no token
    tops, sums, mixes = [], [], []
    for lo in range(0, 200, 64):
        blk = s[..., lo : lo + 64]
        top = blk.amax(-1)
        e = torch.exp(blk - torch.where(torch.isfinite(top), top, 0)[..., None])
        tops.append(top)
        sums.append(e.sum(-1))
        mixes.append(torch.einsum("abt,abtd->abd", e, v[:, :, lo : lo + 64]))
    got = triton_decode.merge(torch.stack(tops, -1), torch.stack(sums, -1), torch.stack(mixes, -2))
    want = torch.einsum("abt,abtd->abd", torch.softmax(s, -1).nan_to_num(0.0), v)
    torch.testing.assert_close(got, want)


def test_forms_it_does_not_take_are_named():
    from attentionpack.parts import Factors, LowRankPart

    gen = torch.Generator().manual_seed(1)
    pieces = layer_pieces(gen, "exact", "exact", [4, 50, 10])
    query = torch.randn(B, H * G, 1, D, generator=gen)
    assert "float64" in triton_decode.why_not(pieces, query.double())
    assert "2 query tokens" in triton_decode.why_not(pieces, torch.randn(B, H * G, 2, D))
    pre_rope = LowRankPart(
        Factors(torch.randn(B, 50, 8), torch.randn(B, 8, H * D)),
        H,
        positions=torch.arange(50, dtype=torch.int32).expand(B, -1),
    )
    pieces[1] = Piece(pre_rope, pieces[1].values, 4, 54)
    assert "before RoPE" in triton_decode.why_not(pieces, query)  # the reason the C plan gives (plan.form_reason)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    pieces = layer_pieces(gen, "exact", "exact", [4, 10])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in triton_decode.why_not(pieces, torch.randn(B, H * G, 1, D))


def _steps(model, config, device: str, steps: int = 3) -> tuple[torch.Tensor, dict]:
    """Teacher-forced logits (steps, vocab) of one-token steps after a 180-token prefill, and the paths taken."""
    from tiny_models import VOCAB

    from attentionpack import PackedCache

    ids = torch.randint(0, VOCAB, (1, 180 + steps), generator=torch.Generator().manual_seed(0)).to(device)
    cache = PackedCache(model, config)
    logits = []
    with torch.inference_mode():
        model(input_ids=ids[:, :180], past_key_values=cache, use_cache=True, logits_to_keep=1)
        before = dict(cache.stats()["attention_paths"])
        for i in range(180, 180 + steps):
            out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1].float().cpu())
    after = cache.stats()["attention_paths"]
    return torch.stack(logits), {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}


CONFIGS: dict = {"balanced": "balanced", "max": "max", "budget": {"budget": 0.25}}
CONFIGS["razor"] = dict(PRESETS["razor"], window=32, chunk=16)  # retrieval heads whole, the others a window

CONFIGS["budget+keep"] = {"budget": 0.25, "keep": 0.5}  # evicted tokens: per-head segments with slots


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_model_decodes_through_triton_as_through_c(config, monkeypatch, cache_root):
    """The same cache decoded by the C step and by the Triton step (ATTENTIONPACK_DECODE names the backend; under
    ATTENTIONPACK_STRICT neither may fall back): the same logits up to float32 summation order."""
    from tiny_models import build_model

    from attentionpack import PackConfig

    if DEVICE != "cpu":
        pytest.skip("the C step runs on CPU only; the CUDA run is test_cuda_model_matches_cpu")
    model = build_model("llama")
    spec = CONFIGS[config]
    cfg = PackConfig(**spec) if isinstance(spec, dict) else spec
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    monkeypatch.setenv("ATTENTIONPACK_DECODE", "c")
    want, c_paths = _steps(model, cfg, "cpu")
    monkeypatch.setenv("ATTENTIONPACK_DECODE", "triton")
    got, t_paths = _steps(model, cfg, "cpu")
    assert set(c_paths) == {"fused"} and set(t_paths) == {"triton"}
    assert c_paths["fused"] == t_paths["triton"] == 3 * model.config.num_hidden_layers
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_an_unknown_backend_is_named(monkeypatch):
    from attentionpack.attention.packed import decode_backend

    monkeypatch.setenv("ATTENTIONPACK_DECODE", "cuda")
    with pytest.raises(ValueError, match="ATTENTIONPACK_DECODE='cuda'.*auto, c, triton"):
        decode_backend(torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cuda_model_matches_cpu(config, monkeypatch, cache_root):
    """A model and its cache on CUDA (prefill on the torch path, decoding steps on Triton) give the CPU run's
    logits."""
    from tiny_models import build_model

    from attentionpack import PackConfig

    spec = CONFIGS[config]
    cfg = PackConfig(**spec) if isinstance(spec, dict) else spec
    model = build_model("llama")
    want, _ = _steps(model, cfg, "cpu")
    monkeypatch.setenv("ATTENTIONPACK_STRICT", "1")
    got, paths = _steps(model.to("cuda"), cfg, "cuda")
    assert set(paths) == {"triton"}
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
