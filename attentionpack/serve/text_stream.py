"""Streaming text of generated tokens: token ids -> text deltas that never split a character or emit part of a stop
string early (used by the OpenAI routes in app.py)."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Token ids -> text deltas; ends at a stop string (excluded) and never emits a stop string's prefix early.

    Incremental: each token decodes only the ids since the last complete text plus the piece before them as context
    (`prefix`..`read`), and a stop string is looked for only where it could end in the new text. Decoding every id
    again at every token made a 4,000-token answer cost 8 million ids of decoding (the approach of TGI's and vLLM's
    incremental detokenizers; the text equals one decode of all ids, tested on the embedded model's tokenizer)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read]
        self.prefix = 0  # ids[prefix:read]: the last complete piece, decoded again with the new ids as context
        self.read = 0
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to send, whether a stop string ended the text)."""
        self.ids.append(token)
        start = max(0, len(self.text) - self.hold)  # a stop string ending in the new text begins here or later
        before = self._decode(self.prefix, self.read)
        after = self._decode(self.prefix, len(self.ids))
        if not after.endswith("\ufffd"):  # else an incomplete UTF-8 character: wait for its next token
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        for stop in self.stops:
            at = self.text.find(stop, start)
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        return self._take(len(self.text) - self.hold), False

    def flush(self) -> str:
        if self.read < len(self.ids):  # an incomplete character at the end: sent as the tokenizer decodes it
            self.text += self._decode(self.prefix, len(self.ids))[len(self._decode(self.prefix, self.read)) :]
            self.prefix = self.read = len(self.ids)
        return self._take(len(self.text))

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
