"""IncrementalDetokenizer: token ids in, text out, never splitting a UTF-8 character.

Decodes a short window of recent tokens and extends the text only when the new suffix does not
end in a replacement character (an incomplete multi-byte sequence). Finds stop strings, and holds
back the last few characters from streaming while they could still be the start of one.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# tokens of context decoded before the new ones, so tokenizers that drop leading spaces keep them
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> str | None:
        """Add one generated token; return the stop string it completed, if any (text is cut before it)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        start = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if not self.stop:
            return None
        window = max(0, start - self.holdback)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, window)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self.text = self.text[:i]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while unfinished, keep back what could begin a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
