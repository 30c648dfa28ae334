"""Triton kernels of decodekit (import name ``decodekit.kernels``).

One op per module: ``process`` (launch 1: bias, masks, penalties, temperature,
row statistics), ``draw`` (launch 2: thresholds, draw, commit; or the processed
distribution), ``verify`` (speculative decoding's exact batched verification,
``decodekit.kernels.verify.verify``). Kernels import nothing from decodekit; the torch reference of every
op is decodekit.reference.
"""

from ._common import launch_shape
from .draw import accept, select
from .process import process_logits

__all__ = ["accept", "launch_shape", "process_logits", "select"]
