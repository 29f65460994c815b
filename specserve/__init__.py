"""specserve: a speculative-decoding inference server."""

from specserve.llm import LLM, Completion
from specserve.sampling_params import SamplingParams

__all__ = ["LLM", "Completion", "SamplingParams"]
