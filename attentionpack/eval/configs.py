"""Configuration names of an evaluation run: what each name means, validated before any long work starts.

Names: "dynamic" (transformers DynamicCache), "static" (transformers StaticCache: preallocated to the length a
measurement needs, a speed baseline only), our presets ("lossless", "balanced", "max"), a custom PackConfig as
"pack:key_energy=0.98,value_energy=0.95", a byte budget as "budget-0.125" (PackConfig(budget=0.125)),
transformers QuantizedCache peers ("quanto-4", "quanto-2", "hqq-4", any "<backend>-<bits>"), and NVIDIA kvpress
presses as "kvpress-<press>-<ratio>" (e.g. "kvpress-snapkv-0.5").
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from .. import PRESETS, PackConfig

# kvpress press names accepted here -> class name in the kvpress package (0.5.5). Only presses that work with
# sdpa attention on a causal LM and take a `compression_ratio` are listed.
KVPRESS_PRESSES = {
    "expected": "ExpectedAttentionPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "streamingllm": "StreamingLLMPress",
    "tova": "TOVAPress",
    "keydiff": "KeyDiffPress",
    "random": "RandomPress",
    "pyramidkv": "PyramidKVPress",
}
KVPRESS_ALIASES = {
    "expectedattention": "expected",
    "expected_attention": "expected",
    "streaming": "streamingllm",
    "streaming_llm": "streamingllm",
}
QUANT_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
QUANT_RESIDUAL = 128  # full-precision recent tokens of QuantizedCache, as in ../shared/docs/peers.md

# The default run (sized for 30 minutes on 2 cores, README: Evaluation); --full: the acceptance protocol of issue 13;
# PEER_CONFIGS: the peers of the earlier single-model default, by name with --configs.
DEFAULT_CONFIGS = ("dynamic", "budget-0.125", "balanced")
FULL_CONFIGS = ("dynamic", "budget-0.25", "budget-0.125", "budget-0.0625", "balanced", "max")
PEER_CONFIGS = (
    "quanto-4",
    "quanto-2",
    "hqq-4",  # "lossless" on request (it equals dynamic)
    *(
        f"kvpress-{press}-{ratio}"
        for press in ("expected", "snapkv", "knorm", "streamingllm")
        for ratio in ("0.5", "0.75", "0.875")
    ),
)


@dataclass(frozen=True)
class Spec:
    """One configuration under test. kind: "dynamic", "static", "pack" (ours), "quantized" or "kvpress"."""

    name: str
    kind: str
    pack: PackConfig | None = None
    backend: str | None = None
    nbits: int | None = None
    press: str | None = None
    ratio: float | None = None

    @property
    def ours(self) -> bool:
        return self.kind == "pack"

    @property
    def in_process(self) -> bool:
        """Runs in this process's environment (kvpress runs in its own virtual environment)."""
        return self.kind != "kvpress"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.pack is not None:
            out["pack_config"] = {k: v for k, v in dataclasses.asdict(self.pack).items() if k != "name"}
        if self.backend:
            out.update(backend=self.backend, nbits=self.nbits, residual_length=QUANT_RESIDUAL)
        if self.press:
            out.update(press=KVPRESS_PRESSES[self.press], compression_ratio=self.ratio)
        return out


def parse_config(name: str) -> Spec:
    """A configuration name -> Spec, or a ValueError that says what is accepted."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"configuration name {name!r} is empty")
    name = name.strip()
    low = name.lower()
    if low == "dynamic":
        return Spec("dynamic", "dynamic")
    if low == "static":
        return Spec("static", "static")
    if low in PRESETS:
        return Spec(low, "pack", pack=PackConfig.preset(low))
    if low.startswith("pack:"):
        return Spec(name, "pack", pack=_parse_pack(name[5:], name))
    m = re.fullmatch(r"budget-([0-9.]+)", low)
    if m:
        try:
            fraction = float(m.group(1))
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise ValueError(
                f"configuration {name!r}: the budget must be a fraction of DynamicCache's bytes in "
                f"(0, 1], e.g. budget-0.125"
            )
        return Spec(f"budget-{fraction:g}", "pack", pack=PackConfig(budget=fraction, name=f"budget-{fraction:g}"))
    m = re.fullmatch(r"(quanto|hqq)-(\d+)", low)
    if m:
        backend, bits = m.group(1), int(m.group(2))
        if bits not in QUANT_BITS[backend]:
            raise ValueError(f"configuration {name!r}: {backend} supports {QUANT_BITS[backend]} bits, not {bits}")
        return Spec(low, "quantized", backend=backend, nbits=bits)
    m = re.fullmatch(r"kvpress-([a-z_]+)-([0-9.]+)", low)
    if m:
        press = KVPRESS_ALIASES.get(m.group(1), m.group(1))
        if press not in KVPRESS_PRESSES:
            raise ValueError(
                f"configuration {name!r}: unknown kvpress press {m.group(1)!r}; choose one of {sorted(KVPRESS_PRESSES)}"
            )
        try:
            ratio = float(m.group(2))
        except ValueError:
            ratio = -1.0
        if not 0 < ratio < 1:
            raise ValueError(
                f"configuration {name!r}: the compression ratio must be a number in (0, 1), e.g. kvpress-{press}-0.5"
            )
        return Spec(f"kvpress-{press}-{ratio:g}", "kvpress", press=press, ratio=ratio)
    raise ValueError(
        f"unknown configuration {name!r}; use 'dynamic', 'static', a preset {sorted(PRESETS)}, "
        "'pack:key=value,...' (PackConfig fields), 'budget-<fraction>' (e.g. budget-0.125), 'quanto-4', "
        "'quanto-2', 'hqq-4' or "
        f"'kvpress-<press>-<ratio>' with press in {sorted(KVPRESS_PRESSES)}"
    )


def parse_configs(names) -> list[Spec]:
    """Parse and de-duplicate; "dynamic" (the reference of every ratio) is always included, first. The word "peers"
    stands for PEER_CONFIGS."""
    expanded = [
        p for n in names for p in (PEER_CONFIGS if isinstance(n, str) and n.strip().lower() == "peers" else (n,))
    ]
    specs = [parse_config(n) for n in expanded]
    if not specs:
        raise ValueError("no configuration given")
    out, seen = [Spec("dynamic", "dynamic")], {"dynamic"}
    for spec in specs:
        if spec.name not in seen:
            seen.add(spec.name)
            out.append(spec)
    return out


def _parse_value(raw: str):
    low = raw.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw.strip().strip("'\"")


def _parse_pack(body: str, name: str) -> PackConfig:
    fields = {f.name for f in dataclasses.fields(PackConfig)} - {"name"}
    kwargs = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"configuration {name!r}: {item!r} is not key=value")
        if key not in fields:
            raise ValueError(f"configuration {name!r}: unknown PackConfig field {key!r}; fields: {sorted(fields)}")
        kwargs[key] = _parse_value(value)
    if not kwargs:
        raise ValueError(f"configuration {name!r}: give at least one PackConfig field, e.g. pack:key_energy=0.98")
    try:
        return PackConfig(**kwargs, name=name)
    except (TypeError, ValueError) as err:
        raise ValueError(f"configuration {name!r}: {err}") from err


def make_cache(model, spec: Spec, max_len: int | None = None):
    """A fresh cache for an in-process configuration. `max_len`: the tokens it must hold, which transformers'
    StaticCache preallocates ("static" needs it; the others grow)."""
    if spec.kind == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if spec.kind == "static":
        if max_len is None:
            raise ValueError(
                "'static' (StaticCache) is a speed baseline: it preallocates the length of a timed run; "
                "use it in bench speed or --speed-configs, not for quality or needle cells"
            )
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=max_len)
    if spec.kind == "pack":
        from .. import PackedCache

        return PackedCache(model, spec.pack)
    if spec.kind == "quantized":
        from transformers import QuantizedCache

        assert spec.backend is not None  # parse_config sets it for quantized configurations
        return QuantizedCache(spec.backend, model.config, nbits=spec.nbits, residual_length=QUANT_RESIDUAL)
    raise ValueError(f"{spec.name} runs in the kvpress environment, not in this process")


def check_available(spec: Spec) -> str | None:
    """None if the configuration can run here, else why not (a missing optional package)."""
    if spec.kind != "quantized" or spec.backend is None:
        return None
    import importlib.util

    module = {"quanto": "optimum.quanto", "hqq": "hqq"}[spec.backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pkg = {"quanto": "optimum-quanto==0.2.7", "hqq": "hqq==0.2.8.post1"}[spec.backend]
        return f"{spec.name} needs the package {pkg} (pip install '{pkg}', or pip install -e '.[eval]')"
    return None
