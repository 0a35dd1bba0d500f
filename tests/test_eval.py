"""The evaluation harness (attentionpack/eval): end to end on a tiny random Llama with a tokenizer trained offline,
resume, bad inputs, and (real_model) the perplexity protocol against a full forward pass on SmolLM2."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from attentionpack.eval import agreement, cells, configs, needle, quality_phase, report, runner

WORDS = (
    "the king wrote plays for the globe theatre in london and his company acted them before the queen "
    "while poets praised sonnets about love time and death in the old city by the river"
).split()


def _prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while sum(len(s.split()) for s in sentences) < n_words:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random LlamaForCausalLM and a byte-level BPE tokenizer (trained here, offline) with a chat template,
    saved as a model folder that `load_model` reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<|im_start|>", "<|im_end|>"]
    corpus = [_prose(200, s) for s in range(5)] + [needle.INSTRUCTION, needle.QUESTION, needle.NEEDLE, "0123456789"]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    text = folder / "prose.txt"
    text.write_text(_prose(900, seed=7))
    return folder


SMALL = dict(
    windows=1,
    contexts=(192,),
    continuation=12,
    needle_lengths=(320, 400),
    needle_depths=(0.0, 0.5, 1.0),
    needle_trials=1,
    needle_new_tokens=4,
    speed_contexts=(64, 192),
    speed_steps=3,
    speed_repeats=1,
    judge_layers=0,
)


def _summary_from_md(md: str) -> list[list[str]]:
    block = md.split("## Summary")[1].split("\n\n")[1]
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]


def test_end_to_end_artifacts_resume_and_unavailable_kvpress(tiny_folder, tmp_path, monkeypatch):
    from attentionpack.eval.peers import KvpressUnavailable

    def no_venv(**kw):
        raise KvpressUnavailable("cannot create the kvpress environment (test)")

    monkeypatch.setattr(quality_phase, "ensure_kvpress_env", no_venv)
    out = tmp_path / "run"
    kw = dict(
        model=str(tiny_folder),
        texts=[str(tiny_folder / "prose.txt")],
        progress=False,
        configs=["dynamic", "max", "pack:key_energy=0.9,value_energy=0.9", "kvpress-snapkv-0.5"],
        needle_configs=("dynamic", "max"),
        **{**SMALL, "judge_layers": 2, "judge_budget": 0.5},
    )
    res = runner.evaluate(out, **kw)
    saved = json.loads((out / "results.json").read_text())
    (key,) = saved["models"]
    names = ("results.json", "report.md", "index.html", f"pareto-{key}.png", "needle.png", "speed.png", "judge.png")
    for name in names:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {r["config"]: r for r in saved["summary"]}
    assert set(rows) == {"dynamic", "max", "pack:key_energy=0.9,value_energy=0.9", "kvpress-snapkv-0.5"}
    dyn, mx = rows["dynamic"], rows["max"]
    assert dyn["ppl"] > 1 and dyn["ppl_change_pct"] == 0 and dyn["compression_x"] == 1
    assert mx["bytes_after_prefill"] > 0 and 0 <= mx["top1_agreement"] <= 1 and mx["mean_kl"] >= 0
    assert mx["peak_rss"] > mx["rss_after_load"] > 0  # measured in its own child process
    assert dyn["decode_ratio"] == 1 and mx["speed_source"] == "interleaved rounds"
    assert set(saved["needle"][key]) == {"dynamic", "max"} and dyn["needle_rate"] is not None
    assert saved["kvpress_env"]["status"] == "unavailable" and rows["kvpress-snapkv-0.5"]["ppl"] is None
    md = (out / "report.md").read_text()
    assert "unavailable" in md and "cannot create the kvpress environment (test)" in md
    (judged,) = saved["judge"][key].values()  # the judge: one text, two layers, every candidate installed alone
    assert len(judged["layers"]) == 2 and judged["control_kl_max"] < 1e-6
    assert "## The budget's judge vs measured KL" in md and f"{judged['spearman_pooled']:.2f}" in md
    (target,) = saved["targets"]["quality"]  # `max` has a target; one window is fewer than the protocol's 4
    assert target["config"] == "max" and target["holds"] is None and "## Targets" in md
    # every number of the summary in report.md is the one in results.json
    assert _summary_from_md(md) == report.summary_table(saved["summary"])
    assert f"{dyn['ppl']:.2f}" in md and f"<img src='pareto-{key}.png'" in (out / "index.html").read_text()
    assert not list((out / "cells").glob("*.log"))
    assert len(list((out / "cells").glob("*.f32"))) == 1  # the reference only
    # resume: the same folder reuses every cell and measures nothing again
    again = runner.evaluate(out, **kw)
    assert again["cells"]["measured"] == 0 and again["cells"]["reused"] == res["cells"]["measured"]
    assert [r["ppl"] for r in again["summary"]] == [r["ppl"] for r in saved["summary"]]
    # a changed setting only re-measures what it touches (here: the needle grid of one more configuration)
    third = runner.evaluate(out, **{**kw, "needle_configs": ("dynamic", "max", "pack:key_energy=0.9,value_energy=0.9")})
    assert third["cells"]["measured"] == len(SMALL["needle_lengths"]) * len(SMALL["needle_depths"])


def test_bad_inputs_fail_early_with_clear_messages(tiny_folder, tmp_path):
    text = str(tiny_folder / "prose.txt")
    base = dict(model=str(tiny_folder), progress=False, **SMALL)
    cases = [
        (dict(texts=[text], configs=["dynamic", "bogus"]), "unknown configuration 'bogus'"),
        (dict(texts=[text], configs=["kvpress-nopress-0.5"]), "unknown kvpress press"),
        (dict(texts=[text], configs=["kvpress-snapkv-1.5"]), "compression ratio"),
        (dict(texts=[text], configs=["pack:key_enrgy=0.9"]), "unknown PackConfig field 'key_enrgy'"),
        (dict(texts=[text], configs=["pack:key_energy=2"]), "key_energy"),
        (dict(texts=[text], configs=["quanto-3"]), "supports"),
        (dict(texts=[text], configs=["dynamic", "static"]), "'static' (StaticCache) is a speed baseline"),
        (dict(texts=[str(tmp_path / "missing.txt")]), "does not exist"),
        (dict(texts=[text], contexts=(5000,)), "tokens but"),
    ]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    cases.append((dict(texts=[str(bad_jsonl)]), "bad.jsonl:2"))
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            runner.evaluate(tmp_path / "never", **{**base, **kw})
    assert not (tmp_path / "never").exists()  # nothing written before the inputs are valid

    from typer.testing import CliRunner

    from attentionpack.cli import app

    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "x"), "--configs", "dynamic nope"])
    assert result.exit_code == 2 and "unknown configuration 'nope'" in result.output


def test_config_names_agreement_and_needle_prompt(tiny_folder):
    spec = configs.parse_config("pack:key_energy=0.98,value_codec=exact,value_energy=None,window=32")
    assert spec.ours and spec.pack.key_energy == 0.98 and spec.pack.value_codec == "exact" and spec.pack.window == 32
    assert configs.parse_config("kvpress-ExpectedAttention-0.875").name == "kvpress-expected-0.875"
    assert configs.parse_config("HQQ-4").describe()["residual_length"] == 128
    assert [s.name for s in configs.parse_configs(["max", "max"])] == ["dynamic", "max"]

    logp = torch.log_softmax(torch.randn(6, 11), -1)
    same = agreement.agreement_stats(logp, logp)
    assert same["top1_agreement"] == 1 and same["mean_kl"] == pytest.approx(0, abs=1e-12) and same["steps"] == 5
    other = agreement.agreement_stats(logp, torch.log_softmax(torch.randn(6, 11), -1))
    assert other["mean_kl"] > 0

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    hay = tok(_prose(600, 3), add_special_tokens=False).input_ids
    for depth in (0.0, 0.5, 1.0):
        p = needle.build_prompt(tok, hay, 300, depth, "48213")
        assert len(p.ids) == 300
        assert "48213" in tok.decode(p.ids[p.needle_at : p.needle_at + 20])
        assert tok.decode(p.question_ids).endswith(needle.ANSWER_START)
    assert needle.score(tok, p, tok(" 48213.", add_special_tokens=False).input_ids)[1]
    with pytest.raises(ValueError, match="haystack"):
        needle.build_prompt(tok, hay[:50], 300, 0.5, "12345")


def test_quantized_peer_bytes_are_counted(tiny_model):
    pytest.importorskip("optimum.quanto")
    from attentionpack import cache_nbytes as held_bytes

    model = tiny_model("llama")
    spec, dyn = configs.parse_config("quanto-4"), configs.parse_config("dynamic")
    held = {}
    for sp in (spec, dyn):
        cache = configs.make_cache(model, sp)
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (1, 200)), past_key_values=cache, use_cache=True)
        held[sp.name] = held_bytes(cache)
    # 200 tokens x 2 layers x (K, V) x 2 heads x 16 dims: fp32 = 102,400 bytes; 4-bit codes alone are 1/8 of it
    assert held["dynamic"] == 2 * 2 * 2 * 200 * 16 * 4
    assert held["dynamic"] / 8 <= held["quanto-4"] < held["dynamic"] / 2


@pytest.mark.real_model
def test_continuation_protocol_equals_full_forward_on_smollm2(real_model):
    from transformers import DynamicCache

    from attentionpack.eval.data import read_text, token_ids
    from attentionpack.eval.perplexity import continuation_perplexity, full_forward_perplexity

    model, tok = real_model
    ids = token_ids(tok, read_text(), 320)
    full = full_forward_perplexity(model, ids, 256, 48)
    for make in (
        lambda: DynamicCache(config=model.config),
        lambda: configs.make_cache(model, configs.parse_config("lossless")),
    ):
        res = continuation_perplexity(model, ids, 256, 48, make)
        assert res.ppl == pytest.approx(full, rel=1e-4)


def test_kvpress_worker_on_tiny_model(tiny_folder, tmp_path):
    """The worker in kvpress's own environment (skipped until `ensure_kvpress_env()` has created it)."""
    from transformers import AutoTokenizer

    from attentionpack.eval.peers import kvpress_env_info, kvpress_needle, kvpress_quality

    if kvpress_env_info() is None:
        pytest.skip("the kvpress environment is not created yet (attentionpack eval creates it once)")
    tok = AutoTokenizer.from_pretrained(tiny_folder)
    ids = tok((tiny_folder / "prose.txt").read_text(), add_special_tokens=False).input_ids
    spec = configs.parse_config("kvpress-snapkv-0.5")
    full = kvpress_quality(None, ids, 160, 8, model=str(tiny_folder), logits_out=tmp_path / "ref.f32")
    half = kvpress_quality(spec, ids, 160, 8, model=str(tiny_folder), logits_out=tmp_path / "half.f32")
    assert half["tokens_kept"] == 80 and full["tokens_kept"] == 160
    assert half["bytes_after_prefill"] == full["bytes_after_prefill"] // 2 and half["peak_rss"] > 0
    stats = agreement.compare_files(tmp_path / "ref.f32", tmp_path / "half.f32", len(tok))
    assert stats["steps"] == 7 and 0 <= stats["top1_agreement"] <= 1
    prompt = needle.build_prompt(tok, ids, 320, 0.5, "48213")
    items = []
    kvpress_needle(spec, [prompt], [tok.eos_token_id], 4, model=str(tiny_folder), on_item=items.append)
    assert len(items) == 1 and 1 <= len(items[0]["answer_ids"]) <= 4


def test_exact_cache_shortcut_equals_one_token_steps(tiny_model):
    """`timed_steps`: for an exact cache, one call over the rest of the continuation = one-token steps."""
    from transformers import DynamicCache

    from attentionpack.eval.perplexity import continuation_perplexity

    model = tiny_model("qwen2_sliding")
    ids = torch.randint(3, 128, (1, 90), generator=torch.Generator().manual_seed(1))
    rows = {}
    for steps in (None, 3):
        seen = []
        res = continuation_perplexity(
            model, ids, 50, 40, lambda: DynamicCache(config=model.config), on_logits=seen.append, timed_steps=steps
        )
        rows[steps] = (res, torch.cat(seen))
    assert rows[3][1].shape == rows[None][1].shape == (40, 128)
    # fp32 logits of one multi-token call vs one-token steps: the same math in another summation order (seen:
    # 1.2e-5 apart on one machine, within 1e-5 on another)
    torch.testing.assert_close(rows[3][1], rows[None][1], atol=5e-5, rtol=0)
    assert abs(rows[3][0].ppl - rows[None][0].ppl) < 1e-4 * rows[None][0].ppl


def test_a_budget_too_small_for_the_prompts_is_reported_not_fatal(tiny_folder, tmp_path):
    """budget-0.02 cannot hold these short prompts (the exact window alone is ~20% of them): the quality cell
    fails with a note, the needle prompts are marked not run, and every artifact is still written."""
    out = tmp_path / "budget"
    res = runner.evaluate(
        out,
        model=str(tiny_folder),
        texts=[str(tiny_folder / "prose.txt")],
        progress=False,
        configs=["dynamic", "budget-0.02"],
        needle_configs=("dynamic", "budget-0.02"),
        **{**SMALL, "speed_repeats": 0},
    )
    saved = json.loads((out / "results.json").read_text())
    (grid,) = saved["needle"].values()
    assert grid["budget-0.02"]["rate"] is None and grid["dynamic"]["rate"] is not None
    assert all(r["hit"] is None and "infeasible" in r["error"] for r in grid["budget-0.02"]["trials"])
    assert any(n.startswith("needle ") and " budget-0.02:" in n and "not run" in n for n in res["notes"])
    assert any("budget-0.02" in n and "infeasible" in n for n in res["notes"])  # the quality cell's failure
    assert (out / "needle.png").stat().st_size > 0 and (out / "report.md").is_file()


def test_quality_bars_finish_at_n(tiny_folder, tmp_path, monkeypatch):
    """Every quality bar ends at N/N (it was ticked after being closed: it showed 0/N)."""
    import io

    bars = []
    real = cells.bar

    def recording(enabled, **kw):
        bars.append(real(True, file=io.StringIO(), **kw))
        return bars[-1]

    monkeypatch.setattr(cells, "bar", recording)
    runner.evaluate(
        tmp_path / "bars",
        model=str(tiny_folder),
        texts=[str(tiny_folder / "prose.txt")],
        progress=True,
        configs=["dynamic", "max"],
        **{**SMALL, "needle_trials": 0, "speed_repeats": 0},
    )
    quality = [b for b in bars if b.desc.startswith("quality")]
    assert len(quality) == 2 and all(b.n == b.total == SMALL["continuation"] - 1 for b in quality), [
        (b.desc, b.n, b.total) for b in quality
    ]


def test_kvpress_install_is_announced_first_and_can_be_skipped(tiny_folder, tmp_path, monkeypatch, capsys):
    """Before the kvpress environment is created, a notice says what is installed and how to skip it; with
    kvpress=False (--no-kvpress) the kvpress configurations are left out, with a note, and nothing is installed."""
    from attentionpack.eval.peers import KvpressUnavailable

    order = []
    monkeypatch.setattr(quality_phase, "kvpress_env_info", lambda: None)

    def no_venv(**kw):
        order.append("install" if "--no-kvpress" in capsys.readouterr().err else "install before notice")
        raise KvpressUnavailable("cannot create the kvpress environment (test)")

    monkeypatch.setattr(quality_phase, "ensure_kvpress_env", no_venv)
    kw = dict(
        model=str(tiny_folder),
        texts=[str(tiny_folder / "prose.txt")],
        progress=False,
        configs=["dynamic", "kvpress-snapkv-0.5"],
        needle_configs=("dynamic",),
        **{**SMALL, "needle_trials": 0, "speed_repeats": 0},
    )
    runner.evaluate(tmp_path / "announce", **kw)
    assert order == ["install"]
    skipped = runner.evaluate(tmp_path / "skip", kvpress=False, **kw)
    assert order == ["install"]  # not called again
    assert any("left out (--no-kvpress): kvpress-snapkv-0.5" in n for n in skipped["notes"])
    assert "kvpress-snapkv-0.5" not in {r["config"] for r in skipped["summary"]}


def test_cli_speed_configs_none_skips_the_speed_rounds(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attentionpack.cli import app

    seen: dict = {}

    def fake(out, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(runner, "evaluate", fake)
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "x"), "--speed-configs", "none"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen["speed_repeats"] == 0 and "speed_configs" not in seen
    CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "x"), "--speed-configs", "dynamic static"])
    assert seen["speed_configs"] == ("dynamic", "static") and seen["speed_repeats"] == 2
