"""`attentionpack generate --image`, `load_vlm` and `attentionpack bench vlm` on a tiny random LLaVA folder."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from attentionpack import UnsupportedModelError, load_vlm
from attentionpack.bench.vlm import run as run_vlm_bench
from attentionpack.cli import app


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    from attentionpack.bench.tiny_vlm import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(40 + 8 * i, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "prompt.txt").write_text("Describe the two pictures in one long sentence, comparing them. " * 3)
    return root


def _generate(*args):
    return CliRunner().invoke(app, ["generate", "-n", "4", *map(str, args)])


def test_generate_with_images_prints_per_modality_bytes(vlm_folder, files):
    result = _generate(
        "-f", files / "prompt.txt", "--model", vlm_folder, "--image", files / "img0.png", "--image", files / "img1.png"
    )
    assert result.exit_code == 0, result.output
    assert "image tokens" in result.output and "text tokens" in result.output


def test_unreadable_image_fails_before_loading(vlm_folder, files):
    for bad in (files / "broken.png", files / "missing.png"):
        result = _generate("-f", files / "prompt.txt", "--model", vlm_folder, "--image", bad)
        assert result.exit_code == 2
        assert f"cannot read image '{bad}'" in result.output


def test_images_need_a_supported_vlm_folder(files, tmp_path):
    result = _generate("-f", files / "prompt.txt", "--image", files / "img0.png")
    assert result.exit_code == 2 and "needs --model with a local vision-language model folder" in result.output
    other = tmp_path / "paligemma"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
    result = _generate("-f", files / "prompt.txt", "--model", other, "--image", files / "img0.png")
    assert result.exit_code == 2 and "'paligemma'" in result.output and "llava" in result.output
    with pytest.raises(UnsupportedModelError, match="not a supported vision-language model"):
        load_vlm(other)


def test_bench_vlm_ratio_grows_with_images_as_the_arithmetic_says():
    rows = run_vlm_bench(image_counts=(1, 4), image_size=64)  # 64 tokens per image >= min_span
    images = [r for r in rows if r["modality"] == "image"]
    assert images and all(r["bytes"] == r["arithmetic"] for r in images)
    for basis in ("per_image", "shared"):
        total = [r for r in rows if r["modality"] == "all" and r["basis"] == basis]
        assert all(r["dynamic_bytes"] == r["real_dynamic_bytes"] for r in total)
        assert total[1]["ratio"] > total[0]["ratio"]
    shared = [r["ratio"] for r in images if r["basis"] == "shared"]
    assert shared[1] > shared[0]  # one basis for all images: its cost is shared
