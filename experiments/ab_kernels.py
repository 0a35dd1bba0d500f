"""A/B of the C kernels: the kernels of a git revision (default HEAD) against the working tree's, alternated step by
step on one cache in one process, so that both builds meet the same data and the same spells of a shared machine.
Prints each build's median decoding step and the time inside `DecodePlan.run` (batch 1), and the ratio.

Usage: python experiments/ab_kernels.py [--rev HEAD] [--model smollm2] [--context 8192] [--batch 1]
[--config budget=0.125] [--steps 40]   (--batch > 1 repeats the cache, as `bench speed`'s throughput table does)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from attentionpack import PackedCache, kernels, load_model
from attentionpack.bench.speed import _ids
from attentionpack.generation import pack_config
from attentionpack.kernels import plan

ROOT = Path(__file__).resolve().parent.parent


def build(rev: str, where: Path) -> Path:
    """Compile revision `rev`'s kernel sources with the package's flags into `where`."""
    for name in ("common.h", *(p.name for p in kernels.SOURCES)):
        text = subprocess.run(
            ["git", "show", f"{rev}:attentionpack/kernels/{name}"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (where / name).write_bytes(text)
    target = where / "kernels.so"
    sources = [str(where / p.name) for p in kernels.SOURCES]
    subprocess.run(["cc", *kernels.FLAGS, "-fopenmp", *sources, "-o", str(target), "-lm"], check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--config", default="budget=0.125", help="a preset or budget=F")
    ap.add_argument("--steps", type=int, default=40, help="steps per build")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new = kernels.library()
    if new is None:
        raise SystemExit(f"the working tree's kernels are not available: {kernels.reason()}")
    with tempfile.TemporaryDirectory() as tmp:
        old = kernels.load(build(args.rev, Path(tmp)))
        builds = {args.rev: old, "working tree": new}
        model, tok = load_model(None if args.model == "smollm2" else args.model)
        budget = float(args.config.split("=", 1)[1]) if args.config.startswith("budget=") else None
        cache = PackedCache(model, pack_config("balanced" if budget is not None else args.config, budget))
        ids = _ids(tok, args.context + 2 * args.steps + 1, 1)
        step_s: dict[str, list[float]] = {name: [] for name in builds}
        in_run = dict.fromkeys(builds, 0.0)
        current = [args.rev]
        run = plan.DecodePlan.run

        def timed_run(self: plan.DecodePlan, *a: object, **k: object) -> torch.Tensor:
            t = time.perf_counter()
            out = run(self, *a, **k)  # type: ignore[arg-type]
            in_run[current[0]] += time.perf_counter() - t
            return out

        plan.DecodePlan.run = timed_run  # type: ignore[method-assign]
        with torch.inference_mode():
            model(ids[:, : args.context], past_key_values=cache, use_cache=True, logits_to_keep=1)
            if args.batch > 1:
                cache.batch_repeat_interleave(args.batch)
            for i in range(2 * args.steps):
                current[0] = list(builds)[i % 2]
                kernels._lib = builds[current[0]]
                at = args.context + i
                t = time.perf_counter()
                model(ids[:, at : at + 1].expand(args.batch, 1).contiguous(), past_key_values=cache, use_cache=True)
                step_s[current[0]].append(time.perf_counter() - t)
        kernels._lib = new
    med = {name: statistics.median(ts[2:]) for name, ts in step_s.items()}
    for name in builds:
        print(
            f"{name:>14}: step {1e3 * med[name]:.2f} ms (median of {len(step_s[name]) - 2}), "
            f"in DecodePlan.run {1e3 * in_run[name] / len(step_s[name]):.2f} ms per step"
        )
    print(f"working tree / {args.rev}: {med['working tree'] / med[args.rev]:.3f}")


if __name__ == "__main__":
    main()
