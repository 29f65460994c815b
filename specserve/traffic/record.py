"""TrafficRecord: one served request as the traffic log keeps it, and its compact byte encoding.

A record holds what the draft needs to learn from a request without running the verifier again: the
prompt and output token ids, the verifier's top-m log-probabilities at every generated position
(row i is the distribution output token i was drawn from), and how each verification step went.
Stores keep the arrays as little-endian byte blobs: token ids and top-m ids as int32, log-probs as
float16 (2 bytes a value: a record of n generated tokens with m = 20 costs about 120 n bytes).
Knows nothing about where records are stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from specserve.engine.trace import RequestTrace

STEP_SOURCES = ("draft", "ngram", "none")
"""Who proposed a verification step's tokens (``SpecStep.source``); 'none': plain decoding (k = 0)."""


@dataclass
class TrafficRecord:
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    topm_ids: torch.Tensor  # [n, m] int32: the verifier's m most likely tokens at each generated position
    topm_logprobs: torch.Tensor  # [n, m] float32: their log-probabilities (temperature 1); stored as float16
    steps: list[tuple[str, int, int]]  # (source, num_draft_tokens, num_accepted) per verification step
    draft_version: str
    key_id: str
    """Hashed API key id (``server.auth.APIKey.key_id``; "anonymous" without keys); never the key itself."""
    created_at: float = field(default_factory=time.time)
    """Unix time the request finished."""
    record_id: int | None = None
    """Assigned by the store when written; increases with every record a store writes."""

    def __post_init__(self) -> None:
        n = len(self.output_token_ids)
        if self.topm_ids.dim() != 2 or self.topm_ids.shape != self.topm_logprobs.shape:
            raise ValueError(
                f"topm_ids {tuple(self.topm_ids.shape)} and topm_logprobs {tuple(self.topm_logprobs.shape)} "
                "must both be [num_output_tokens, m]"
            )
        if self.topm_ids.shape[0] != n:
            raise ValueError(f"top-m arrays have {self.topm_ids.shape[0]} rows for {n} output tokens; need one a token")
        for source, _, _ in self.steps:
            if source not in STEP_SOURCES:
                raise ValueError(f"step source must be one of {STEP_SOURCES}, got {source!r}")

    @property
    def m(self) -> int:
        return self.topm_ids.shape[1]

    @staticmethod
    def from_trace(trace: RequestTrace, key_id: str, created_at: float | None = None) -> TrafficRecord:
        """The record of a finished request's trace; shares its tensors (no copy)."""
        return TrafficRecord(
            prompt_token_ids=trace.prompt_token_ids,
            output_token_ids=trace.output_token_ids,
            topm_ids=trace.topm_ids,
            topm_logprobs=trace.topm_logprobs,
            steps=[(s.source, s.num_draft_tokens, s.num_accepted) for s in trace.steps],
            draft_version=trace.draft_version,
            key_id=key_id,
            created_at=time.time() if created_at is None else created_at,
        )


@dataclass(frozen=True)
class EncodedRecord:
    """A record's columns as stores write them."""

    created_at: float
    key_id: str
    draft_version: str
    m: int
    prompt_ids: bytes  # [prompt] int32 little-endian
    output_ids: bytes  # [n] int32 little-endian
    topm_ids: bytes  # [n, m] int32 little-endian, row-major
    topm_logprobs: bytes  # [n, m] float16 little-endian, row-major
    steps: str  # JSON list of [source, num_draft_tokens, num_accepted]

    @property
    def nbytes(self) -> int:
        """The record's size in the store, counted for the byte bound: its blobs and strings."""
        blobs = (self.prompt_ids, self.output_ids, self.topm_ids, self.topm_logprobs)
        return sum(map(len, blobs)) + len(self.steps) + len(self.key_id) + len(self.draft_version)


def _int32(values) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def encode(record: TrafficRecord) -> EncodedRecord:
    return EncodedRecord(
        created_at=record.created_at,
        key_id=record.key_id,
        draft_version=record.draft_version,
        m=record.m,
        prompt_ids=_int32(record.prompt_token_ids),
        output_ids=_int32(record.output_token_ids),
        topm_ids=_int32(record.topm_ids.cpu().numpy()),
        topm_logprobs=record.topm_logprobs.cpu().numpy().astype("<f2").tobytes(),
        steps=json.dumps([list(s) for s in record.steps], separators=(",", ":")),
    )


def decode(row: EncodedRecord, record_id: int) -> TrafficRecord:
    """The record a stored row holds; log-probs come back as float32 holding the stored float16 values."""
    output_ids = np.frombuffer(row.output_ids, dtype="<i4").tolist()
    shape = (len(output_ids), row.m)
    ids = np.frombuffer(row.topm_ids, dtype="<i4").astype(np.int32).reshape(shape)
    logprobs = np.frombuffer(row.topm_logprobs, dtype="<f2").astype(np.float32).reshape(shape)
    return TrafficRecord(
        prompt_token_ids=np.frombuffer(row.prompt_ids, dtype="<i4").tolist(),
        output_token_ids=output_ids,
        topm_ids=torch.from_numpy(ids),
        topm_logprobs=torch.from_numpy(logprobs),
        steps=[(s, int(d), int(a)) for s, d, a in json.loads(row.steps)],
        draft_version=row.draft_version,
        key_id=row.key_id,
        created_at=row.created_at,
        record_id=record_id,
    )
