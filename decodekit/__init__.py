"""decodekit: a PyTorch/Triton GPU decoding runtime.

Public surface: :class:`SamplingParams`, :class:`Sampler` (per-request state in
device slots, fused Triton kernels on CUDA, torch reference elsewhere), the functional
:func:`sample` / :func:`processed_probs`, :func:`load`, :class:`TokenGenerator` (the
per-step API for schedulers), :class:`LLM` (generate / stream) and :class:`EOSTracker`.
"""

from .draft_models import DraftModel, LayerSkipDraft
from .drafters import NGramDraft, SpecStats
from .eos import EOSTracker
from .functional import processed_probs, sample
from .generator import (
    GenerationStatus,
    TextGenerationContext,
    TextGenerationResponse,
    TextResponse,
    TokenGenerator,
)
from .kv_cache import SlotKVCache
from .llm import LLM, RequestOutput
from .loading import load
from .outputs import LogProbabilities, SamplerOutput
from .params import SamplingParams
from .sampler import Sampler

__all__ = [
    "DraftModel",
    "EOSTracker",
    "GenerationStatus",
    "LLM",
    "LayerSkipDraft",
    "NGramDraft",
    "SpecStats",
    "RequestOutput",
    "SlotKVCache",
    "TextGenerationContext",
    "TextGenerationResponse",
    "TextResponse",
    "TokenGenerator",
    "load",
    "LogProbabilities",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "processed_probs",
    "sample",
]
__version__ = "0.1.0"
