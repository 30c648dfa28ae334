"""Speculative decoding's sampling ops, where they live now (kept for existing imports).

Exact batched verification: :func:`verify` (the Triton kernel on CUDA, the torch
reference :func:`verify_reference` elsewhere) and the drafters' :func:`draw`, both in
:mod:`decodekit.sampling`; a :class:`~decodekit.Sampler` offers them keyed by its slots
(:meth:`~decodekit.Sampler.verify`, :meth:`~decodekit.Sampler.draw`).
"""

from __future__ import annotations

from .sampling.reference import ACCEPT_LANE, draw, verify_reference
from .sampling.sampler import verify

__all__ = ["ACCEPT_LANE", "draw", "verify", "verify_reference"]
