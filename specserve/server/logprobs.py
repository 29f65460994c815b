"""OpenAI logprobs on the wire: the engine's TokenLogprobs as chat ``logprobs.content`` entries and as the
legacy /v1/completions ``logprobs`` object (tokens, token_logprobs, top_logprobs, text_offset).

A token's text is the text of its own bytes. Byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3,
Qwen2) spell every byte as one character of a fixed table, so a token's exact bytes are recovered even
when they are only part of a UTF-8 character; such a token's text shows the stray bytes as ``\\xNN``
escapes, and ``bytes`` carries them exactly. Byte-fallback pieces (``<0xNN>``) are one byte each; any
other token (and added / special tokens) is its own decoded text. ``text_offset`` counts characters of
these token texts, as vLLM's does. Knows nothing about engines, requests or HTTP.
"""

from __future__ import annotations

import re

from tokenizers import decoders
from transformers import PreTrainedTokenizerBase

from specserve.engine.logprobs import TokenLogprobs
from specserve.server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a logprob below this (a logit of -inf) is sent as this, as vLLM does."""

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable Latin-1 bytes stand for themselves,
    the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenText:
    """Token id -> (text, UTF-8 bytes), memoised. Called on the event loop only (dict reads and writes)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._alphabet = byte_level_alphabet() if byte_level else None
        self._added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._memo: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._memo.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self._memo[token_id] = (raw.decode("utf-8", errors="backslashreplace"), raw)
        return found

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode()


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_logprobs(text: TokenText, entries: list[TokenLogprobs]) -> ChatLogprobs:
    """Chat format: per token its text, logprob, bytes and ``top_logprobs`` (the n asked for, most likely first)."""

    def top(token_id: int, logprob: float) -> TopLogprob:
        token, raw = text(token_id)
        return TopLogprob(token=token, logprob=_finite(logprob), bytes=list(raw))

    content = [
        ChatTokenLogprob(**top(e.token_id, e.logprob).model_dump(), top_logprobs=[top(i, lp) for i, lp in e.top])
        for e in entries
    ]
    return ChatLogprobs(content=content)


class CompletionLogprobsWriter:
    """One choice's legacy logprobs, written piece by piece (stream chunks, or the parts of one response):
    ``text_offset`` runs on from piece to piece."""

    def __init__(self, text: TokenText) -> None:
        self.text = text
        self.offset = 0
        """Where the next token's text starts in the choice's text."""

    def prompt(self, token_ids: list[int], entries: list[TokenLogprobs | None], prompt_text: str) -> CompletionLogprobs:
        """The echoed prompt's tokens (the first has no logprob: null); generated tokens then start after
        ``prompt_text``, as they do in the choice's text."""
        out = self._write(token_ids, entries)
        self.offset = len(prompt_text)
        return out

    def generated(self, entries: list[TokenLogprobs]) -> CompletionLogprobs:
        return self._write([e.token_id for e in entries], entries)

    def _write(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, e in zip(token_ids, entries, strict=True):
            token = self.text(token_id)[0]
            out.tokens.append(token)
            out.text_offset.append(self.offset)
            self.offset += len(token)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_finite(e.logprob))
            # the n most likely, and the chosen token always (up to n + 1 entries, as OpenAI's)
            top = {self.text(i)[0]: _finite(lp) for i, lp in e.top}
            top.setdefault(token, _finite(e.logprob))
            out.top_logprobs.append(top)
        return out


def joined(parts: list[CompletionLogprobs]) -> CompletionLogprobs:
    """Pieces of one choice's logprobs (e.g. the echoed prompt's, then the generated tokens') as one."""
    out = CompletionLogprobs()
    for p in parts:
        out.tokens += p.tokens
        out.token_logprobs += p.token_logprobs
        out.top_logprobs += p.top_logprobs
        out.text_offset += p.text_offset
    return out
