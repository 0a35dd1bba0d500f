"""A tiny random-weight LLaVA-style VLM, built offline, for the VLM benchmark and the README example.

Its outputs are meaningless (random weights); it exists so that the cache's memory behaviour on vision-language
prompts can be shown and checked without downloading anything. `save_tiny_llava` also writes a processor (a byte
level tokenizer with a chat template, a PIL CLIP image processor), so the folder works with
`attentionpack generate --image ... --model FOLDER` exactly like a real local LLaVA folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIALS = ["<pad>", "<s>", "</s>", IMAGE_TOKEN]
PATCH = 8
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _tokenizer():
    """Byte-level tokenizer (256 byte tokens, no merges) plus <pad> <s> </s> <image>: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in SPECIALS:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llava(image_size: int = 32, seed: int = 0):
    """(model, image token id, tokens per image): CLIP tower (patch 8) + 2-layer Llama (hidden 64, 2 KV heads x 16)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vocab = 256 + len(SPECIALS)
    image_id = 256 + SPECIALS.index(IMAGE_TOKEN)
    tokens = (image_size // PATCH) ** 2
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=8192,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=tokens,
        vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = 256
    return model, image_id, tokens


def save_tiny_llava(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny random LLaVA model folder (config, weights, processor): meaningless outputs, for trying things."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    model, _, _ = tiny_llava(image_size, seed)
    model.save_pretrained(folder)
    tokenizer = _tokenizer()
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder
