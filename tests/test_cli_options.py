"""The command line: every option says what it does, help texts survive Rich's markup, `generate --budget` and
`--threads` work and are validated."""

from __future__ import annotations

import pytest
import torch
from rich.markup import render
from typer.main import get_command
from typer.testing import CliRunner

from attentionpack.cli import app


def _commands(group, prefix=""):
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, f"{prefix}{name} ") if hasattr(cmd, "commands") else [(f"{prefix}{name}", cmd)]


COMMANDS = list(_commands(get_command(app)))


def test_commands_found():
    assert {"generate", "eval", "bench quality", "bench speed", "bench vlm"} <= {n for n, _ in COMMANDS}


@pytest.mark.parametrize("name,cmd", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_option_has_a_help_text_that_rich_keeps(name, cmd):
    for param in cmd.params:
        if param.name == "help" or param.param_type_name != "option":
            continue
        text = getattr(param, "help", None)
        assert text and text.strip(), f"{name} {param.opts[0]} has no help text"
        assert render(text).plain == text, f"{name} {param.opts[0]}: Rich markup eats part of {text!r}"


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("hello")
    return path


@pytest.mark.parametrize(
    "args,words",
    [
        (["--preset", "max", "--budget", "0.25"], ["--preset and --budget exclude each other"]),
        (["--budget", "0"], ["--budget 0 is invalid", "(0, 1]"]),
        (["--budget", "1.5"], ["--budget 1.5 is invalid"]),
        (["--threads", "0"], ["Usage"]),  # typer rejects it (min=1)
        (["--device", "tpu"], ["--device 'tpu'", "cpu or cuda"]),
        (["--device", "gpu0"], ["is not a device", "cpu or cuda"]),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], ["no CUDA device is visible"])]),
)
def test_generate_rejects_bad_budget_and_threads(prompt, args, words):
    result = CliRunner().invoke(app, ["generate", "-f", str(prompt), *args])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output


def test_generate_with_budget_and_threads_on_a_tiny_model(tmp_path, tiny_model):
    """--budget selects PackConfig(budget=F): the table names it and the bytes held stay within F x DynamicCache."""
    from test_broken_models import _tokenizer

    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    text = " ".join(f"t{3 + i % 90}" for i in range(300))
    (tmp_path / "p.txt").write_text(text)
    from attentionpack.generation import run_generate

    got = run_generate(text, model_path=str(folder), max_new_tokens=2, chat=False, budget=0.5, threads=1)
    slot = 2 * 2 * 2 * 16 * 4  # bytes per token: 2 layers x (K, V) x 2 KV heads x head dim 16 x float32
    assert got["bytes"] <= 0.5 * got["dynamic_bytes"] + 18 * slot  # + the generated tokens and the tail's spare slots
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "-f",
            str(tmp_path / "p.txt"),
            "--model",
            str(folder),
            "-n",
            "2",
            "--no-chat",
            "--budget",
            "0.5",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "budget=0.5" in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_generate_on_cuda_answers_as_on_cpu(tmp_path, tiny_model):
    """generate --device cuda: the model, its inputs and the cache on the GPU (decoding steps on Triton); greedy
    tokens as on CPU."""
    from test_broken_models import _tokenizer

    from attentionpack.generation import run_generate

    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    text = " ".join(f"t{3 + i % 90}" for i in range(300))
    args = dict(model_path=str(folder), max_new_tokens=4, chat=False, budget=0.5, threads=1)
    on_cpu, on_gpu = run_generate(text, **args), run_generate(text, device="cuda", **args)
    assert on_gpu["answer"] == on_cpu["answer"]
