"""decodekit: a PyTorch/Triton GPU decoding runtime.

Public surface: :class:`SamplingParams`, :class:`Sampler` (per-request state in
device slots, fused Triton kernels on CUDA, torch reference elsewhere) and the
functional :func:`sample` / :func:`processed_probs`.
"""

from .functional import processed_probs, sample
from .outputs import LogProbabilities, SamplerOutput
from .params import SamplingParams
from .sampler import Sampler

__all__ = [
    "LogProbabilities",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "processed_probs",
    "sample",
]
__version__ = "0.1.0"
