"""Runs NVIDIA kvpress presses for the evaluation harness, inside kvpress's own virtual environment.

Standalone on purpose: kvpress 0.5.5 needs transformers < 5.3, so this file imports only the standard library,
torch, transformers and kvpress, never attentionpack. It is started as `VENV/bin/python kvpress_worker.py JOB.json`
and speaks the line protocol of `attentionpack.eval.child`: `@progress N`, `@item {json}`, one `@result {json}`.

Jobs ("mode"):
  quality: the continuation-perplexity protocol. The press is applied while the context is prefilled (kvpress
           compresses the cache at the end of the prefill); the continuation is then teacher-forced one token at a
           time with explicit positions, as kvpress's own pipeline decodes. Reports perplexity, bytes held after
           prefill, timings and peak RSS; writes per-step log-probabilities (float32 rows) to `logits_out`.
  needle:  for each prompt, prefill its context with the press, then its question without (as kvpress's pipeline
           does), then greedy-decode; one `@item` per prompt with the answer's token ids.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time


def _rss_now():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _press(name, ratio):
    import kvpress

    if name is None:
        return None
    return getattr(kvpress, name)(compression_ratio=ratio)


def _held_bytes(cache):
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is None or not hasattr(t, "untyped_storage"):
                continue
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _prefill(model, ids, cache, press, start_pos=0):
    import contextlib

    import torch

    pos = torch.arange(start_pos, start_pos + ids.shape[1]).unsqueeze(0)
    ctx = press(model) if press is not None else contextlib.nullcontext()
    with ctx:
        return model(input_ids=ids, past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1)


def quality(job, model, torch):
    from transformers import DynamicCache

    ids = torch.tensor([job["ids"]], dtype=torch.long)
    n, m = job["context"], job["continuation"]
    press = _press(job.get("press"), job.get("ratio"))
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = _prefill(model, ids[:, :n], cache, press)
    prefill_s = time.perf_counter() - t0
    held = _held_bytes(cache)
    kept = cache.get_seq_length()
    targets = ids[:, n : n + m]
    sink = open(job["logits_out"], "wb") if job.get("logits_out") else None

    def record(logits):
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        if sink:
            sink.write(logp.numpy().tobytes())
        return logp

    nll = [-float(record(out.logits)[targets[0, 0]])]
    times = []
    # presses compress at prefill only: decoded tokens stay exact, so after `timed_steps` timed one-token steps the
    # rest of the continuation goes in one call (same logits up to round-off; see attentionpack/eval/perplexity.py)
    stepped = min(int(job.get("timed_steps") or m - 1), m - 1)
    for i in range(stepped):
        t1 = time.perf_counter()
        out = model(
            input_ids=targets[:, i : i + 1], past_key_values=cache, use_cache=True, position_ids=torch.tensor([[n + i]])
        )
        times.append(time.perf_counter() - t1)
        nll.append(-float(record(out.logits)[targets[0, i + 1]]))
        if (i + 1) % 16 == 0:
            print(f"@progress {i + 1}", flush=True)
    if stepped < m - 1:
        out = model(
            input_ids=targets[:, stepped:-1],
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.arange(n + stepped, n + m - 1)[None],
        )
        for j in range(out.logits.shape[1]):
            nll.append(-float(record(out.logits[:, j : j + 1])[targets[0, stepped + 1 + j]]))
        print(f"@progress {m - 1}", flush=True)
    if sink:
        sink.close()
    times.sort()
    mean = sum(nll) / len(nll)
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens_scored": len(nll),
        "prefill_s": prefill_s,
        "decode_ms": 1000
        * (times[len(times) // 2] if len(times) % 2 else (times[len(times) // 2 - 1] + times[len(times) // 2]) / 2)
        if times
        else None,
        "bytes_after_prefill": held,
        "bytes_at_end": _held_bytes(cache),
        "tokens_kept": kept,
    }


def needle(job, model, torch):
    from transformers import DynamicCache

    press = _press(job.get("press"), job.get("ratio"))
    eos = set(job.get("eos", []))
    for k, prompt in enumerate(job["prompts"]):
        ctx = torch.tensor([prompt["context_ids"]], dtype=torch.long)
        q = torch.tensor([prompt["question_ids"]], dtype=torch.long)
        cache = DynamicCache()
        t0 = time.perf_counter()
        _prefill(model, ctx, cache, press)
        out = _prefill(model, q, cache, None, start_pos=ctx.shape[1])
        prefill_s = time.perf_counter() - t0
        pos = ctx.shape[1] + q.shape[1]
        answer = []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(job["max_new_tokens"]):
            answer.append(int(nxt))
            if int(nxt) in eos or len(answer) == job["max_new_tokens"]:
                break
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[pos + step]]))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        print("@item " + json.dumps({"index": k, "answer_ids": answer, "prefill_s": prefill_s}), flush=True)
    return {"prompts": len(job["prompts"])}


def _exit_with_parent():
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(2)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(path):
    _exit_with_parent()
    started = time.perf_counter()
    with open(path) as f:
        job = json.load(f)
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    import kvpress  # noqa: F401  (patches attention functions for head-wise presses)
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32, local_files_only=True).eval()
    rss_after_load, peak_after_load = _rss_now(), _peak()
    load_s = time.perf_counter() - started
    with torch.inference_mode():
        out = {"quality": quality, "needle": needle}[job["mode"]](job, model, torch)
    peak = _peak()
    out.update(
        rss_after_load=rss_after_load,
        peak_rss_after_load=peak_after_load,
        peak_rss=peak,
        peak_rss_delta=peak - (rss_after_load or peak_after_load),
        load_s=load_s,
        threads=torch.get_num_threads(),
        versions={"kvpress": _version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__},
    )
    print("@result " + json.dumps(out), flush=True)


def _version(name):
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: kvpress_worker.py JOB.json")
    main(sys.argv[1])
