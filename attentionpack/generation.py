"""`attentionpack generate`: answer a prompt with a compressed cache and show what it holds."""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm
from transformers.generation.streamers import BaseStreamer

from .cache import PackedCache
from .config import PackConfig
from .models import SUPPORTED_VLM_TYPES, check_device, is_vlm_folder, load_model, load_vlm
from .models.loading import folder_model_type
from .models.registry import language_model_of


class _ProgressStreamer(BaseStreamer):
    """Progress bars for `generate`: the prefill bar advances per decoder layer of the prompt's forward calls
    (hooks; `calls` of them for a chunked prefill), then the decoding bar advances per generated token.

    transformers hands the prompt to `put` before the prefill runs, so `put` cannot mark the prefill's end; the
    last layer of the first forward call does, and only then does the decoding bar start (its rate excludes the
    prefill)."""

    def __init__(self, model, prompt_tokens: int, max_new_tokens: int, file=None, calls: int = 1):
        layers: torch.nn.ModuleList = language_model_of(model).layers  # type: ignore[assignment]
        self.layers = len(layers) * calls  # a chunked prefill passes every layer once per chunk
        self.file = file
        unit = "layer" if calls == 1 else "layer x chunk"
        self.prefill = tqdm(
            total=self.layers, desc=f"prefill {prompt_tokens} tokens", unit=unit, leave=False, file=file
        )
        self.decode = None
        self.max_new_tokens = max_new_tokens
        self.hooks = [layer.register_forward_hook(self._layer_done) for layer in layers]

    def _layer_done(self, module, args, output):
        if self.decode is not None:
            return
        self.prefill.update(1)
        if self.prefill.n >= self.layers:  # the prompt's forward call has passed every layer
            self.prefill.close()
            self.decode = tqdm(total=self.max_new_tokens, desc="decoding", unit="tok", leave=False, file=self.file)

    def put(self, value):
        if self.decode is not None:  # the first call carries the prompt (before the prefill): nothing to count
            self.decode.update(1)

    def end(self):
        for hook in self.hooks:
            hook.remove()
        self.prefill.close()
        if self.decode is not None:
            self.decode.close()


def size_ratio(held: int, dynamic: int) -> str:
    """How `held` bytes compare with DynamicCache's `dynamic`: "4.12x smaller", "same size", "1.02x larger"."""
    if not held or not dynamic:
        return "-"
    if held == dynamic:
        return "same size"
    return f"{dynamic / held:.2f}x smaller" if held < dynamic else f"{held / dynamic:.2f}x larger"


def encode_prompt(tokenizer, text: str, chat: bool) -> torch.Tensor:
    """Token ids (1, T) of the prompt, wrapped in the chat template when asked and available."""
    if not text.strip():
        raise ValueError("the prompt is empty; give a prompt file with some text")
    if chat and getattr(tokenizer, "chat_template", None):
        return encode_messages(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text, return_tensors="pt").input_ids


def encode_messages(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (1, T) of a chat (`[{"role": ..., "content": ...}, ...]`) through the tokenizer's chat template,
    ending with the assistant's generation prompt. Raises ValueError when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template; give plain 'prompt' rows instead of 'messages'")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


def chunk_calls(start: int, prompt_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """The [begin, end) token ranges a chunked prefill feeds: from `start` (tokens the cache already holds) up to
    the prompt's last token, which is left for `generate` (its call yields the first answer token's logits).
    `chunk` <= 0, or a remainder of at most `chunk` tokens: one call (no chunking)."""
    if chunk <= 0 or prompt_tokens - start <= chunk:
        return []
    return [(b, min(b + chunk, prompt_tokens - 1)) for b in range(start, prompt_tokens - 1, chunk)]


@torch.inference_mode()
def prefill_chunks(model, input_ids: torch.Tensor, cache, calls: list[tuple[int, int]]) -> None:
    """Feed `input_ids` (1, T) to the model over `calls` (`chunk_calls`), one forward call per range: each chunk
    attends to the cache as it holds the earlier chunks (compressed, for a PackedCache) and is then compacted by
    it, so the prefill's peak memory follows the compressed cache and one chunk's activations rather than the whole
    prompt's (issue: long prompts that fit). Logits are computed for one position per call only."""
    for begin, end in calls:
        model(input_ids=input_ids[:, begin:end], past_key_values=cache, use_cache=True, logits_to_keep=1)


def check_length(model, prompt_tokens: int, max_new_tokens: int) -> None:
    config = getattr(model.config, "text_config", None) or model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's limit of "
            f"{limit} positions; shorten the prompt or lower --max-new-tokens"
        )


def read_images(paths) -> list:
    """Open every image (RGB) before any long work; a clear error names the file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ValueError(
                f"cannot read image {str(path)!r}: {err}; give a readable PNG, JPEG, WebP, GIF or BMP file"
            ) from err
    return images


def encode_vlm_prompt(processor, text: str, images: list, chat: bool) -> dict:
    """Processor inputs (input_ids, pixel_values...) for `images` followed by the prompt text."""
    if not text.strip():
        raise ValueError("the prompt is empty; give a prompt file with some text")
    if chat and getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:  # no template: the processor's image placeholder once per image, then the text
        prompt = "".join(f"{getattr(processor, 'image_token', '<image>')}\n" for _ in images) + text
    return dict(processor(images=images or None, text=prompt, return_tensors="pt"))


def check_cache_choice(preset: str | None, budget: float | None) -> None:
    """A command line's --preset / --budget: at most one of them, a budget in (0, 1] (ValueError naming the fix)."""
    if preset is not None and budget is not None:
        raise ValueError("--preset and --budget exclude each other: a budget chooses the encodings itself; give one")
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(
            f"--budget {budget:g} is invalid: give a fraction of DynamicCache's bytes in (0, 1], e.g. 0.25"
        )


def pack_config(preset: str, budget: float | None) -> PackConfig:
    """The cache of `generate` and `batch`: a preset's PackConfig, or `PackConfig(budget=budget)` when given."""
    return PackConfig.preset(preset) if budget is None else PackConfig(budget=budget)


def decoding_kwargs(sample: bool, temperature: float) -> dict:
    """`model.generate` keyword arguments: greedy, or sampling at `temperature` with top_p 0.95."""
    return dict(do_sample=True, temperature=temperature, top_p=0.95) if sample else dict(do_sample=False)


def run_generate(
    text: str,
    preset: str = "balanced",
    model_path: str | None = None,
    max_new_tokens: int = 128,
    chat: bool = True,
    sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
    console: Console | None = None,
    images=(),
    budget: float | None = None,
    threads: int | None = None,
    prefix_store=None,
    prefill_chunk: int = 4096,
    device: str = "cpu",
) -> dict:
    """Generate an answer with a PackedCache; print it and a memory table. Returns the numbers printed.

    `budget` (a fraction of DynamicCache's bytes, in (0, 1]) replaces the preset: `PackConfig(budget=budget)`.
    `threads`: torch's and the kernels' threads (default: torch's, or 1 on a busy machine; attentionpack/threads.py).
    `images` (file paths) need `model_path` to be a local vision-language model folder (see SUPPORTED_VLM_TYPES);
    a VLM folder also works without images. `prefix_store`: a folder (attentionpack/store/prefix.py) whose longest
    stored prefix of the prompt is reused; on a miss the prompt's reusable prefix is stored there. `device`: "cpu"
    or "cuda[:N]" (the model, its inputs and the cache there; decoding steps on the Triton kernels).
    `prefill_chunk`: a text prompt longer than this is prefilled in chunks of this many tokens, each compacted
    before the next (`prefill_chunks`); 0 prefills it in one call."""
    from .threads import apply_threads, choose_threads

    console = console or Console()
    config = pack_config(preset, budget)
    label = f"'{preset}'" if budget is None else f"budget={budget:g}"
    threads, note = choose_threads(threads)
    if note:
        console.print(f"note: {note}", style="yellow")
    apply_threads(threads)
    images = list(images or ())
    vlm = model_path is not None and is_vlm_folder(model_path)
    if images and not vlm:
        raise ValueError(
            f"--image needs --model with a local vision-language model folder ({', '.join(SUPPORTED_VLM_TYPES)}); "
            + (
                "the embedded SmolLM2 is text-only"
                if model_path is None
                else f"{model_path} is not one (model_type {folder_model_type(model_path)!r})"
            )
        )
    pictures = read_images(images)  # before loading: a bad file fails fast
    dev = check_device(device)
    if prefix_store is not None and dev.type != "cpu":
        raise ValueError("--prefix-store keeps its caches on CPU: run it with --device cpu")
    with console.status("loading model"):
        model, tokenizer = load_vlm(model_path) if vlm and model_path is not None else load_model(model_path)
        model.to(dev)
    if vlm:
        processor, tokenizer = tokenizer, getattr(tokenizer, "tokenizer", tokenizer)
        inputs = encode_vlm_prompt(processor, text, pictures, chat)
    else:
        ids = encode_prompt(tokenizer, text, chat)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    ids = inputs["input_ids"]
    check_length(model, ids.shape[1], max_new_tokens)
    if prefix_store is not None and not vlm:
        from .store.prefix import cache_from_store

        cache, reused, note = cache_from_store(prefix_store, model, tokenizer, ids, config, text, chat, encode_prompt)
        console.print(note)
    elif prefix_store is not None:
        raise ValueError("--prefix-store supports text prompts only")
    else:
        cache, reused = PackedCache(model, config), 0
    if prefill_chunk < 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} is invalid: give a number of tokens >= 1, or 0 for one call")
    calls = [] if vlm else chunk_calls(cache.get_seq_length(), ids.shape[1], prefill_chunk)
    torch.manual_seed(seed)
    start = time.perf_counter()
    streamer = _ProgressStreamer(model, ids.shape[1], max_new_tokens, calls=len(calls) + 1)
    kwargs = decoding_kwargs(sample, temperature)
    try:
        prefill_chunks(model, ids, cache, calls)
        out = model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
            **kwargs,
        )
    finally:
        streamer.end()
    elapsed = time.perf_counter() - start
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    console.print(answer.strip())
    held, dynamic = cache.nbytes(), cache.dynamic_nbytes()
    table = Table(
        title=f"KV cache after {cache.get_seq_length()} tokens ({ids.shape[1]} prompt + "
        f"{out.shape[1] - ids.shape[1]} generated), {elapsed:.1f} s"
    )
    for col in ("cache", "bytes held", "MiB", "vs DynamicCache"):
        table.add_column(col, justify="right" if col != "cache" else "left")
    table.add_row("DynamicCache (same tokens)", f"{dynamic:,}", f"{dynamic / 2**20:.2f}", "1.00x")
    table.add_row(f"PackedCache {label}", f"{held:,}", f"{held / 2**20:.2f}", size_ratio(held, dynamic))
    modalities = cache.stats()["modalities"]
    if vlm:  # per modality: what the cache holds for those tokens vs DynamicCache for the same tokens
        for name, m in sorted(modalities.items()):
            table.add_row(
                f"  {name} tokens ({m['entries']:,} layer x sample entries)",
                f"{m['bytes']:,}",
                f"{m['bytes'] / 2**20:.2f}",
                size_ratio(m["bytes"], m["dynamic_bytes"]),
            )
    console.print(table)
    return {
        "answer": answer,
        "bytes": held,
        "dynamic_bytes": dynamic,
        "prompt_tokens": ids.shape[1],
        "modalities": modalities,
        "images": len(pictures),
        "prefix_tokens": reused,
    }
