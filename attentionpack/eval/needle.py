"""Needle (passkey) retrieval: a random 5-digit pass key sentence is hidden in real text at a given depth, the
prompt (of an exact total length in tokens) ends with the question, and the answer is decoded greedily. A trial is a
hit when the 5 digits appear in the answer. The grid is depth x context length.

Prompts are built from token ids, so any tokenizer works; with a chat template (Instruct models) the haystack and the
question form one user turn and the assistant turn is started with "The pass key is", which a small model needs.
A prompt has two parts: `context_ids` (template start, instruction, haystack with the needle) and `question_ids`
(question, template end, answer start): presses that compress only a context (kvpress) prefill them separately.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import BudgetError

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
ANSWER_START = "The pass key is"
_MARK = "\x00HAYSTACK\x00"

# The multi-key task: several doors' pass keys in one document, the question asks for one of them.
MULTI_COLORS = ("red", "blue", "green", "yellow")
MULTI_INSTRUCTION = (
    "Several pass keys are hidden inside a lot of irrelevant text, one for each door of a different color. "
    "Find them and memorize them. I will quiz you about one of them."
)
MULTI_FACT = "The pass key of the {color} door is {key}."
MULTI_QUESTION = "What is the pass key of the {color} door? Answer with the number only."
MULTI_ANSWER_START = "The pass key of the {color} door is"
TASKS = ("passkey", "multikey")


@dataclass
class NeedlePrompt:
    context_ids: list[int]
    question_ids: list[int]
    passkey: str
    length: int
    depth: float
    needle_at: int  # token index of the needle in the whole prompt

    @property
    def ids(self) -> list[int]:
        return self.context_ids + self.question_ids


@dataclass
class TrialResult:
    answer: str
    hit: bool
    prefill_s: float
    decode_ms: float
    answer_ids: list[int] = field(default_factory=list)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _frame(
    tokenizer, chat: bool, instruction: str = INSTRUCTION, question: str = QUESTION, answer_start: str = ANSWER_START
) -> tuple[str, str]:
    """Text before and after the haystack: the chat template around one user turn, plus our wording."""
    head, tail = f"{instruction}\n\n", f"\n\n{question}"
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
        )
        before, _, after = text.partition(_MARK)
        return before + head, tail + after + answer_start
    return head, f"{tail}\n{answer_start}"


def _snap(tokenizer, hay: list[int], at: int) -> int:
    """`at` moved to just after the nearest sentence end within 48 tokens (unchanged at the ends or without one)."""
    room = len(hay)
    if 0 < at < room:
        pieces = tokenizer.convert_ids_to_tokens(hay[max(0, at - 48) : at + 48])
        ends = [max(0, at - 48) + i + 1 for i, p in enumerate(pieces) if p and p.rstrip().endswith(".")]
        if ends:
            at = min(ends, key=lambda e: abs(e - at))
    return at


def build_multikey_prompt(
    tokenizer,
    haystack_ids: Sequence[int],
    length: int,
    depth: float,
    keys: Sequence[str],
    asked: int,
    offset: int = 0,
    chat: bool = True,
) -> NeedlePrompt:
    """A prompt of exactly `length` tokens holding one fact per key ("The pass key of the red door is 12345."), the
    asked one (index `asked`, colors MULTI_COLORS) at `depth` and the others spread at depth + j/len(keys) (mod 1);
    the question asks for the asked door's key. The prompt's `passkey` is the asked key (a hit: it is in the
    answer)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"needle depth {depth} must be in [0, 1]")
    if not 2 <= len(keys) <= len(MULTI_COLORS) or not 0 <= asked < len(keys):
        raise ValueError(f"{len(keys)} keys (2..{len(MULTI_COLORS)}) with asked index {asked}")
    color = MULTI_COLORS[asked]
    before, after = _frame(
        tokenizer,
        chat,
        MULTI_INSTRUCTION,
        MULTI_QUESTION.format(color=color),
        MULTI_ANSWER_START.format(color=color),
    )
    head, question = _encode(tokenizer, before), _encode(tokenizer, after)
    facts = [
        _encode(tokenizer, " " + MULTI_FACT.format(color=MULTI_COLORS[i], key=k) + " ") for i, k in enumerate(keys)
    ]
    room = length - len(head) - len(question) - sum(len(f) for f in facts)
    if room < 16:
        raise ValueError(f"needle context length {length} is too short for the multi-key prompt frame")
    if offset + room > len(haystack_ids):
        raise ValueError(
            f"the haystack text has {len(haystack_ids)} tokens; {offset + room} are needed for a "
            f"{length}-token needle prompt"
        )
    hay = list(haystack_ids[offset : offset + room])
    spots = {
        i: _snap(tokenizer, hay, round(((depth + (i - asked) / len(keys)) % 1.0 if i != asked else depth) * room))
        for i in range(len(keys))
    }
    context, last, needle_at = list(head), 0, 0
    for i in sorted(spots, key=lambda i: (spots[i], i)):
        context += hay[last : spots[i]]
        if i == asked:
            needle_at = len(context)
        context += facts[i]
        last = spots[i]
    context += hay[last:]
    return NeedlePrompt(context, question, keys[asked], length, depth, needle_at=needle_at)


def passkey_for(seed: int, length: int, depth: float, trial: int) -> tuple[str, random.Random]:
    rng = random.Random(f"{seed}-{length}-{depth:.4f}-{trial}")
    return str(rng.randint(10000, 99999)), rng


def build_prompt(
    tokenizer, haystack_ids: Sequence[int], length: int, depth: float, passkey: str, offset: int = 0, chat: bool = True
) -> NeedlePrompt:
    """A prompt of exactly `length` tokens with the needle at `depth` (0 = start, 1 = end) of the haystack,
    snapped to the end of a sentence when one is near."""
    if not 0 <= depth <= 1:
        raise ValueError(f"needle depth {depth} must be in [0, 1]")
    before, after = _frame(tokenizer, chat)
    head, question = _encode(tokenizer, before), _encode(tokenizer, after)
    needle = _encode(tokenizer, " " + NEEDLE.format(key=passkey) + " ")
    room = length - len(head) - len(question) - len(needle)
    if room < 16:
        raise ValueError(f"needle context length {length} is too short for the prompt frame ({length - room} tokens)")
    if offset + room > len(haystack_ids):
        raise ValueError(
            f"the haystack text has {len(haystack_ids)} tokens; {offset + room} are needed for a "
            f"{length}-token needle prompt"
        )
    hay = list(haystack_ids[offset : offset + room])
    at = _snap(tokenizer, hay, round(depth * room))  # just after the nearest sentence end within 48 tokens
    context = head + hay[:at] + needle + hay[at:]
    return NeedlePrompt(context, question, passkey, length, depth, needle_at=len(head) + at)


@torch.inference_mode()
def greedy_answer(
    model,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    make_cache: Callable[[], object],
    max_new_tokens: int = 10,
    eos: Sequence[int] = (),
    after: bool = False,
) -> tuple[list[int], float, float]:
    """Prefill the whole prompt through a fresh cache, then greedy-decode. Returns (ids, prefill_s, decode ms).
    after=True: the question asked after compression: the document (`context_ids`) is prefilled alone, then the
    question goes through the compressed cache in a second call (prefill_s counts both)."""
    cache = make_cache()
    start = time.perf_counter()
    if after:
        model(input_ids=torch.tensor([list(context_ids)]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        ids = torch.tensor([list(question_ids)], dtype=torch.long)
    else:
        ids = torch.tensor([list(context_ids) + list(question_ids)], dtype=torch.long)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    answer, decode_ms = _greedy_from(model, cache, out.logits[:, -1], max_new_tokens, eos)
    return answer, prefill_s, decode_ms


@torch.inference_mode()
def greedy_answers_shared(
    model,
    context_ids: Sequence[int],
    question_ids: Sequence[int],
    makers: dict[str, Callable[[], object] | None],
    max_new_tokens: int = 10,
    eos: Sequence[int] = (),
    after: bool = False,
) -> dict[str, tuple[list[int], float, float] | BudgetError]:
    """`greedy_answer` for several caches with one prefill. The prompt goes through a DynamicCache once; a maker
    returning a PackedCache gets its cache derived from it (`PackedCache.ingest`: prefill attention is exact in our
    cache, so the prefill and its logits are the same) and a maker None decodes on the DynamicCache itself, last.
    prefill_s is the shared prefill's time, except for a cache with a byte budget (`PackConfig.budget`), which
    needs the prompt's queries, and a cache that cannot ingest the shared one (a model with sliding-window layers,
    whose DynamicCache keeps only their window): those are prefilled on their own (a budget's entry is the
    BudgetError when the prompt is too short for it). after=True: the shared prefill holds the document alone;
    each cache is derived from it (compressed without the question), then the question goes through that cache
    in a second call."""
    ids = torch.tensor([list(context_ids) + ([] if after else list(question_ids))], dtype=torch.long)
    question = torch.tensor([list(question_ids)], dtype=torch.long)
    from transformers import DynamicCache

    shared = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=ids, past_key_values=shared, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    first = out.logits[:, -1]
    results: dict[str, tuple[list[int], float, float] | BudgetError] = {}
    for name, make in sorted(makers.items(), key=lambda item: item[1] is None):  # the DynamicCache one last
        cache: Any = shared if make is None else make()
        own = getattr(cache, "planner", None) is not None  # a byte budget scores the prompt's own queries
        if not own and cache is not shared:
            try:
                cache.ingest(shared)
            except ValueError:  # e.g. sliding-window layers: the DynamicCache no longer holds the whole prompt
                own = True
                cache = make()  # type: ignore[misc]  # make is not None here
        if own:

            def same(c: Any = cache) -> Any:
                return c

            try:
                results[name] = greedy_answer(model, context_ids, question_ids, same, max_new_tokens, eos, after)
            except BudgetError as err:  # the prompt is too short for the budget
                results[name] = err
            continue
        logits, asked_s = first, 0.0
        if after:  # the question after compression, through this cache
            t0 = time.perf_counter()
            logits = model(input_ids=question, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            asked_s = time.perf_counter() - t0
        answer, decode_ms = _greedy_from(model, cache, logits, max_new_tokens, eos)
        results[name] = (answer, prefill_s + asked_s, decode_ms)
    return results


def _greedy_from(
    model, cache, logits: torch.Tensor, max_new_tokens: int, eos: Sequence[int]
) -> tuple[list[int], float]:
    """Greedy decoding after a prefill whose last logits are `logits` (1, V). Returns (ids, median decode ms)."""
    answer, times = [], []
    nxt = logits.argmax(-1, keepdim=True)
    for _ in range(max_new_tokens):
        answer.append(int(nxt))
        if int(nxt) in eos or len(answer) == max_new_tokens:
            break
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_ms = 1000 * sorted(times)[len(times) // 2] if times else float("nan")
    return answer, decode_ms


def eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def score(tokenizer, prompt: NeedlePrompt, answer_ids: Sequence[int]) -> tuple[str, bool]:
    answer = tokenizer.decode(list(answer_ids), skip_special_tokens=True)
    return answer, prompt.passkey in answer.replace(",", "").replace(" ", "")


def grid_prompts(
    tokenizer,
    haystack_ids: Sequence[int],
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    chat: bool = True,
    task: str = "passkey",
) -> list[NeedlePrompt]:
    """Every (length, depth, trial) prompt; each trial draws its own pass key and haystack offset. task "multikey":
    four doors' keys (`build_multikey_prompt`), the asked door drawn per prompt, the asked fact at the depth."""
    if task not in TASKS:
        raise ValueError(f"needle task {task!r}: use one of {', '.join(TASKS)}")
    prompts = []
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                key, rng = passkey_for(seed, length, depth, trial)
                spare = max(0, len(haystack_ids) - length)
                offset = rng.randint(0, spare) if trial else 0
                if task == "passkey":
                    prompts.append(build_prompt(tokenizer, haystack_ids, length, depth, key, offset=offset, chat=chat))
                    continue
                keys = [key]
                while len(keys) < len(MULTI_COLORS):
                    other = str(rng.randint(10000, 99999))
                    if other not in keys:
                        keys.append(other)
                asked = rng.randrange(len(keys))
                keys[0], keys[asked] = keys[asked], keys[0]  # the asked door holds `key`
                prompts.append(
                    build_multikey_prompt(tokenizer, haystack_ids, length, depth, keys, asked, offset=offset, chat=chat)
                )
    return prompts


def run_trial(
    model,
    tokenizer,
    prompt: NeedlePrompt,
    make_cache: Callable[[], object],
    max_new_tokens: int = 10,
    after: bool = False,
) -> TrialResult:
    """One needle prompt through a fresh cache; after=True asks the question after compression (`greedy_answer`)."""
    ids, prefill_s, decode_ms = greedy_answer(
        model, prompt.context_ids, prompt.question_ids, make_cache, max_new_tokens, eos_ids(model, tokenizer), after
    )
    answer, hit = score(tokenizer, prompt, ids)
    return TrialResult(answer, hit, prefill_s, decode_ms, ids)


def needle_grid(
    model,
    tokenizer,
    haystack_ids: Sequence[int],
    make_cache: Callable[[], object],
    lengths: Sequence[int] = (1024, 2048, 4096),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    trials: int = 1,
    seed: int = 0,
    max_new_tokens: int = 10,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Hit rate per (length, depth): {"rates": {length: {depth: rate}}, "trials": [...]} for one cache."""
    rows = []
    for prompt in grid_prompts(tokenizer, haystack_ids, lengths, depths, trials, seed):
        res = run_trial(model, tokenizer, prompt, make_cache, max_new_tokens)
        rows.append(
            {
                "length": prompt.length,
                "depth": prompt.depth,
                "passkey": prompt.passkey,
                "answer": res.answer,
                "hit": res.hit,
            }
        )
        if progress:
            progress(1)
    return {"rates": rates_of(rows), "trials": rows}


def rates_of(rows: Sequence[dict]) -> dict:
    """{length: {depth: hit rate}} of trial rows; None where no trial ran (hit None: e.g. a budget the prompt
    is too short for)."""
    out: dict = {}
    for row in rows:
        cell = out.setdefault(int(row["length"]), {}).setdefault(float(row["depth"]), [])
        if row["hit"] is not None:
            cell.append(bool(row["hit"]))
    return {n: {d: sum(h) / len(h) if h else None for d, h in sorted(by.items())} for n, by in sorted(out.items())}
