"""decodekit: a PyTorch/Triton GPU decoding runtime.

Public surface (what users call):

- settings and results: :class:`SamplingParams`, :class:`GuidedDecodingParams`, :class:`GenerationStatus`,
  :class:`TextResponse`, :class:`TextGenerationResponse`, :class:`RequestOutput`,
  :class:`CompletionOutput`, :class:`RequestOutputKind`, :class:`LogProbabilities`,
  :class:`BeamSearchParams`, :class:`BeamSearchOutput`, :class:`BeamSequence`;
- the sampler: :class:`Sampler` and the functional :func:`sample` / :func:`processed_probs`;
- the engine: :class:`TokenGenerator` (the per-step API for schedulers), :class:`Ensemble`, logits processors
  (:class:`ProcessorInputs`, :class:`BatchProcessorInputs`, :class:`HFLogitsProcessor`),
  :class:`TextGenerationContext`, :class:`EOSTracker`, :func:`load`, :class:`LLM`;
- speculative decoding: :class:`NGramDraft`, :class:`DraftModel`, :class:`LayerSkipDraft`,
  :class:`SpecStats`;
- steering: :class:`SteeringVector`, :class:`Steering`, :func:`steer`,
  :func:`train_steering_vector`;
- LoRA adapters: :class:`LoRARequest`, :class:`LoRAResponse`, :class:`LoRAOperation`,
  :class:`LoRAStatus`, :class:`LoRAType`.

The layers below (``decodekit.engine``, ``decodekit.sampling``, ``decodekit.speculative``,
``decodekit.steering``, ``decodekit.structured``, ``decodekit.lora``, ``decodekit.kernels``) are importable
for advanced use.
"""

from .engine.beam import BeamSearchOutput, BeamSearchParams, BeamSequence
from .engine.context import TextGenerationContext
from .engine.ensemble import Ensemble
from .engine.eos import EOSTracker
from .engine.generator import TokenGenerator
from .engine.processors import BatchProcessorInputs, HFLogitsProcessor, ProcessorInputs
from .llm import LLM
from .loading import load
from .lora import LoRAOperation, LoRARequest, LoRAResponse, LoRAStatus, LoRAType
from .outputs import (
    CompletionOutput,
    GenerationStatus,
    LogProbabilities,
    RequestOutput,
    TextGenerationResponse,
    TextResponse,
)
from .params import RequestOutputKind, SamplingParams
from .sampling import Sampler, processed_probs, sample
from .speculative import DraftModel, LayerSkipDraft, NGramDraft, SpecStats
from .steering import Steering, SteeringVector, steer, train_steering_vector
from .structured import GuidedDecodingParams

__all__ = [
    "BatchProcessorInputs",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSequence",
    "CompletionOutput",
    "DraftModel",
    "EOSTracker",
    "Ensemble",
    "GenerationStatus",
    "GuidedDecodingParams",
    "HFLogitsProcessor",
    "LLM",
    "LayerSkipDraft",
    "LoRAOperation",
    "LoRARequest",
    "LoRAResponse",
    "LoRAStatus",
    "LoRAType",
    "LogProbabilities",
    "NGramDraft",
    "ProcessorInputs",
    "RequestOutput",
    "RequestOutputKind",
    "Sampler",
    "SamplingParams",
    "SpecStats",
    "Steering",
    "SteeringVector",
    "TextGenerationContext",
    "TextGenerationResponse",
    "TextResponse",
    "TokenGenerator",
    "load",
    "processed_probs",
    "sample",
    "steer",
    "train_steering_vector",
]
__version__ = "0.1.0"
