"""Sampling: per-slot state, the batched sampler, its torch reference and the functional API.

* :mod:`.slot_state`: the device tables of every slot and their host mirrors;
* :mod:`.sampler`: :class:`Sampler`, which dispatches each step to the Triton kernels
  (:mod:`decodekit.kernels`) or to the torch reference, and the functional :func:`verify`;
* :mod:`.reference`: the torch reference of every kernel (the CPU path and the test oracle);
* :mod:`.functional`: :func:`sample` and :func:`processed_probs` for one-off calls.
"""

from .functional import processed_probs, sample
from .reference import verify_reference
from .sampler import Sampler, verify

__all__ = ["Sampler", "processed_probs", "sample", "verify", "verify_reference"]
