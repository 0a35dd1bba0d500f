"""CPU kernels for attention over stored parts, compiled on first use.

Eager PyTorch spends most of a decoding step on quantized parts turning codes into float blocks (one pass to
unpack, one to scale, one to read them again in a matmul). `part_ops.c` reads each code once and accumulates the
attention output (or the scores) of one part directly (`ops.py` picks it per part); `decode.c` runs a whole
one-token step of a layer (every segment's scores, the softmax and the value mix) in one call over a table that
`plan.py` builds when segments freeze; `quantize.c` group-quantizes rows at several bit widths in one pass (the
budget's candidates, `ops.quantize_widths`). Plain C sharing `common.h`, built with the system C compiler into
~/.cache/attentionpack/kernels (once per machine and source version) and called through ctypes.

The C code sums in float32 whatever it reads: `mix_rows` and `scores_cols` take float32, float16 or bfloat16
activations and convert them to float32 at the call; `decode.c` reads a half-precision model's exact rows and
factor bases as stored (converted block by block, `floats_at` in common.h) and the plan returns its output in the
queries' dtype. If no compiler is found, the build fails, or ATTENTIONPACK_KERNELS=0, `library()` is None and
`reason()` says why; callers then take their torch path and record it (tests/test_kernels.py and
tests/test_fused_decode.py check both paths against float64 references).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..resources import cache_root

HERE = Path(__file__).parent
SOURCES = [HERE / "part_ops.c", HERE / "decode.c", HERE / "quantize.c"]  # each includes common.h
# -mtune=haswell: gcc tunes some AMD cores (znver1) for 128-bit vectors, which halves the speed of these loops
FLAGS = [
    "-O3",
    "-march=native",
    *(["-mtune=haswell"] if platform.machine() in ("x86_64", "AMD64") else []),
    "-funroll-loops",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
]
_lib: ctypes.CDLL | None = None
_tried = False
_why = ""  # why the kernels are not available (empty while they are)


def _cache_dir() -> Path:
    return cache_root() / "kernels"


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    global _why
    if compiler is None:
        _why = "no C compiler found (install gcc, or set CC)"
        warnings.warn(
            "attentionpack: no C compiler found; attention on quantized pieces uses the slower torch path "
            "(install gcc to enable the kernels)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    source = b"".join(p.read_bytes() for p in [*SOURCES, HERE / "common.h"])
    error = None
    for extra in (["-fopenmp"], []):  # threads when the compiler has OpenMP, one thread otherwise
        flags = [*FLAGS, *extra]
        tag = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"kernels-{tag}.so"
        if target.exists():
            break
        error = _compile(compiler, flags, target)
        if error is None:
            break
    if error is not None:
        _why = f"building the kernels with {compiler} failed: {error}"
        warnings.warn(
            f"attentionpack: building the kernels failed ({compiler}): {error}; using the slower torch path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return load(target)


def load(path: Path) -> ctypes.CDLL:
    """A built kernel library at `path`, its entry points typed (also used to load another build side by side,
    experiments/ab_kernels.py)."""
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ap_mix_rows.argtypes = [ptr] * 5 + [i64] * 7 + [ctypes.c_int, i64]
    lib.ap_scores_cols.argtypes = [ptr] * 5 + [i64] * 7 + [ctypes.c_int, i64]
    lib.ap_decode.argtypes = [ptr, i64, ptr, ptr, i64, ctypes.c_float, ctypes.c_float, ptr, i64, i64, i64, i64]
    lib.ap_decode_rows.argtypes = [i64, *[ptr] * 5, ctypes.c_float, ctypes.c_float, ptr, i64, i64, i64]
    lib.ap_quantize.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr]
    lib.ap_mix_rows.restype = lib.ap_scores_cols.restype = lib.ap_decode.restype = None
    lib.ap_decode_rows.restype = lib.ap_quantize.restype = None
    return lib


def _compile(compiler: str, flags: list[str], target: Path) -> str | None:
    """Build `target`; None on success, else the compiler's complaint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # build aside, then rename: concurrent
    os.close(fd)  # processes never load a half-written file
    try:
        done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", tmp, "-lm"], capture_output=True, text=True)
        error = done.stderr.strip()[:500] if done.returncode != 0 else None
    except OSError as err:  # the compiler named by CC does not exist or cannot run
        error = str(err)
    if error is not None:
        os.unlink(tmp)
        return error
    os.replace(tmp, target)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they are disabled or cannot be built (the reason is warned once)."""
    global _lib, _tried, _why
    if not _tried:
        _tried = True
        if os.environ.get("ATTENTIONPACK_KERNELS", "1") != "0":
            _lib = _build()
        else:
            _why = "disabled by ATTENTIONPACK_KERNELS=0"
    return _lib


def reason() -> str:
    """Why `library()` is None ("" when the kernels are loaded)."""
    library()
    return _why


# the float dtypes the C code reads, with their codes (common.h: DT_*); the wrappers and the decode step take
# activations and states of these dtypes and sum in float32
FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ACTIVATION_DTYPES = tuple(FLOAT_CODES)


def usable(codes: torch.Tensor, *activations: torch.Tensor) -> bool:
    """The kernels apply: they are available, `codes` are uint8 and the activations (queries or attention weights)
    are float32, float16 or bfloat16, all on CPU. The wrappers return float32 whatever the activations' dtype."""
    if codes.device.type != "cpu" or codes.dtype != torch.uint8:
        return False
    return all(t.device.type == "cpu" and t.dtype in ACTIVATION_DTYPES for t in activations) and library() is not None


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x (*N, M, T) with contiguous rows laid out evenly (a column slice of a wider matrix is fine) and its row
    stride; otherwise a contiguous copy."""
    if x.stride(-1) != 1 or not _even(x, x.dim() - 1):
        x = x.contiguous()
    return x, x.stride(-2)


def mix_rows(
    codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, p: torch.Tensor, bits: int, group: int, length: int
) -> torch.Tensor:
    """Weighted sum over tokens of per-token quantized rows. codes (*N, T, nb) uint8 (`pack` layout), scales/mins
    (*N, T, G) float16, p (*N, M, T) float32/float16/bfloat16 (read as float32) -> (*N, M, length) float32 with
    length <= G * group."""
    lead = codes.shape[:-2]
    t, nb = codes.shape[-2:]
    m, g = p.shape[-2], scales.shape[-1]
    codes, (p, ps) = codes.contiguous(), _rows(p.to(torch.float32))  # the C code reads float32 rows
    scales, mins = scales.to(torch.float16).contiguous(), mins.to(torch.float16).contiguous()
    out = torch.empty(*lead, m, length, dtype=torch.float32)
    n = codes.numel() // max(1, t * nb)
    lib = library()
    assert lib is not None, reason()
    lib.ap_mix_rows(_ptr(codes), _ptr(scales), _ptr(mins), _ptr(p), _ptr(out), n, m, t, nb, g, group, length, bits, ps)
    return out


def scores_cols(
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group: int,
    tokens: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query rows against rows quantized along tokens. codes (*N, R, nb) uint8 (`pack` layout, `tokens` codes per
    row), scales/mins (*N, R, G) float16, x (*N, M, R) float32/float16/bfloat16 (read as float32)
    -> (*N, M, tokens) float32, written into `out` when given (float32 (*N, M, tokens) with contiguous (M, tokens)
    matrices evenly spaced: a slot of a larger buffer)."""
    lead = codes.shape[:-2]
    r, nb = codes.shape[-2:]
    m, g = x.shape[-2], scales.shape[-1]
    codes, x = codes.contiguous(), x.to(torch.float32).contiguous()  # the C code reads float32 rows
    scales, mins = scales.to(torch.float16).contiguous(), mins.to(torch.float16).contiguous()
    if out is None:
        out = torch.empty(*lead, m, tokens, dtype=torch.float32)
    elif (
        out.dtype != torch.float32
        or tuple(out.shape) != (*lead, m, tokens)
        or out.stride(-1) != 1
        or out.stride(-2) != tokens
        or not _even(out, out.dim() - 2)
    ):
        raise ValueError(
            f"scores_cols: out must be float32 {(*lead, m, tokens)} with contiguous (M, tokens) matrices evenly "
            f"spaced, got {out.dtype} {tuple(out.shape)} strides {out.stride()}"
        )
    n = codes.numel() // max(1, r * nb)
    step = out.stride(-3) if out.dim() > 2 else 0  # floats from one (M, tokens) matrix to the next
    lib = library()
    assert lib is not None, reason()
    lib.ap_scores_cols(
        _ptr(codes), _ptr(scales), _ptr(mins), _ptr(x), _ptr(out), n, m, r, tokens, nb, g, group, bits, step
    )
    return out


def _even(x: torch.Tensor, dims: int) -> bool:
    """x's first `dims` dimensions step evenly through memory (they flatten into one strided dimension)."""
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(dims - 1))


def quantize_rows(
    x: torch.Tensor, widths: tuple[int, ...], group: int
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None:
    """Group-quantize contiguous float32 rows x (*N, L) at every width of `widths` in one pass (quantize.c, the
    arithmetic of `parts.quant.quantize_widths`): ({bits: (codes (*N, nb) uint8 in `pack`'s layout, scales (*N, G)
    float16)}, mins (*N, G) float16), G = ceil(L / group); None when a minimum or a scale is not finite (the torch
    reference then raises its error)."""
    lead, length = x.shape[:-1], x.shape[-1]
    g = min(group, length)
    n_groups = -(-length // g)
    rows = x.numel() // length
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for bits in widths:
        per = 8 // bits
        out[bits] = (
            torch.empty(*lead, -(-(n_groups * g) // per), dtype=torch.uint8),
            torch.empty(*lead, n_groups, dtype=torch.float16),
        )
    mins = torch.empty(*lead, n_groups, dtype=torch.float16)
    table = torch.tensor(
        [list(widths), [out[b][0].data_ptr() for b in widths], [out[b][1].data_ptr() for b in widths]],
        dtype=torch.int64,
    )  # (3, widths): bits, codes and scales addresses
    bad = torch.zeros(1, dtype=torch.int64)
    lib = library()
    assert lib is not None, reason()
    bits, codes, scales = (_ptr(row) for row in table)
    lib.ap_quantize(_ptr(x), rows, length, g, n_groups, bits, len(widths), codes, scales, _ptr(mins), _ptr(bad))
    return None if int(bad) else (out, mins)
