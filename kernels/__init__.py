"""Custom kernels for specserve; currently the speculative-decoding rejection sampler."""

from kernels.rejection_sampler import (
    PLACEHOLDER_TOKEN_ID,
    rejection_sample,
    rejection_sample_reference,
    rejection_sample_triton,
)

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "rejection_sample",
    "rejection_sample_reference",
    "rejection_sample_triton",
]
