"""Custom kernels for specserve: the speculative-decoding rejection sampler and paged decode attention."""

from specserve.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_triton,
)
from specserve.kernels.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    rejection_sample,
    rejection_sample_reference,
    rejection_sample_triton,
)

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
    "rejection_sample",
    "rejection_sample_reference",
    "rejection_sample_triton",
]
