"""Streaming text of generated tokens: token ids -> text deltas that never split a character or emit part of a stop
string early (used by the OpenAI routes in app.py)."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Token ids -> text deltas; ends at a stop string (excluded) and never emits a stop string's prefix early."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to send, whether a stop string ended the text)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                return self._take(len(self.text)), True
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next token
            safe = min(safe, len(self.text) - 1)
        return self._take(safe), False

    def flush(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta


# ---- the application -------------------------------------------------------------------------------------------------
