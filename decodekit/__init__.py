"""decodekit: a PyTorch/Triton GPU decoding runtime.

Public surface: :class:`SamplingParams`, :class:`Sampler` (per-request state in
device slots, fused Triton kernels on CUDA, torch reference elsewhere), the functional
:func:`sample` / :func:`processed_probs`, :func:`load`, :class:`TokenGenerator` (the
per-step API for schedulers), :class:`LLM` (generate / stream), :class:`EOSTracker`, the drafters
(:class:`NGramDraft`, :class:`DraftModel`, :class:`LayerSkipDraft`) and steering
(:class:`SteeringVector`, :class:`Steering`, :func:`steer`, :func:`train_steering_vector`).
"""

from .draft_models import DraftModel, LayerSkipDraft
from .drafters import NGramDraft, SpecStats
from .eos import EOSTracker
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
from .sampling import Sampler, processed_probs, sample
from .steer_hooks import steer
from .steer_train import train_steering_vector
from .steering import Steering, SteeringVector

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
    "Steering",
    "SteeringVector",
    "processed_probs",
    "sample",
    "steer",
    "train_steering_vector",
]
__version__ = "0.1.0"
