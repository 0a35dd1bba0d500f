"""Two processes writing and reading one prefix store at the same time (a minute by default; a bounded loop):
no entry is lost, no load ever sees a partial or damaged file, and the index ends up matching the files."""

from __future__ import annotations

import json
import multiprocessing
import os

from store_helpers import STRESS_CONFIG, store_worker
from tiny_models import build_model

from attentionpack import PackConfig
from attentionpack.store import PrefixStore, load_cache

SECONDS = float(os.environ.get("ATTENTIONPACK_STORE_STRESS_SECONDS", "60"))
MAX_ITERS = 5000


def test_two_processes_share_a_store(tmp_path):
    folder = tmp_path / "store"
    PrefixStore(folder)  # created before the workers race for it
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"w{w}.json" for w in range(2)]
    procs = [
        ctx.Process(target=store_worker, args=(str(folder), w, SECONDS, MAX_ITERS, str(outs[w]))) for w in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=SECONDS + 300)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    reports = [json.loads(o.read_text()) for o in outs]
    for r in reports:
        assert r["errors"] == [], r["errors"][:5]
        assert r["reads"] >= 10 and r["cross_reads"] >= 1
    written = {k for r in reports for k in r["written"]}
    assert None not in written
    store = PrefixStore(folder)
    on_disk = set(os.listdir(folder / "entries"))
    assert written == on_disk == {e.key for e in store.entries()}
    index = json.loads((folder / "index.json").read_text())["entries"]
    assert set(index) == on_disk
    assert os.listdir(folder / "tmp") == []
    model, config = build_model("llama"), PackConfig(**STRESS_CONFIG)
    for key in sorted(written)[:: max(1, len(written) // 20)]:  # a sample of entries loads cleanly
        assert load_cache(folder / "entries" / key, model, config).tokens is not None
