"""Functional conveniences over :class:`~decodekit.Sampler` for one-off calls: a
throw-away sampler with one slot per row."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..params import SamplingParams
from .sampler import Sampler

__all__ = ["processed_probs", "sample"]

Tokens = Sequence[Sequence[int]] | None


def _sampler(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    prompt_token_ids: Tokens,
    output_token_ids: Tokens,
    step: int,
    eos_token_ids: Sequence[int] | None,
) -> Sampler:
    if logits.dim() != 2 or logits.shape[0] < 1:
        raise ValueError(f"logits must be [B, V] with B >= 1, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    plist = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(plist) != B:
        raise ValueError(f"params has {len(plist)} entries for {B} rows")
    for name, seqs in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids)):
        if seqs is not None and len(seqs) != B:
            raise ValueError(f"{name} has {len(seqs)} rows for {B} logits rows")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    s = Sampler(V, B, logits.device, eos_token_ids=eos_token_ids)
    for b, p in enumerate(plist):
        s.add(b, p, None if prompt_token_ids is None else prompt_token_ids[b])
    n_out = max((len(o) for o in output_token_ids), default=0) if output_token_ids else 0
    if n_out:
        tok = torch.full((B, n_out), -1, dtype=torch.int64)
        for b, o in enumerate(output_token_ids):
            tok[b, : len(o)] = torch.as_tensor(list(o), dtype=torch.int64)
            for t in o:
                if not 0 <= int(t) < V:
                    raise ValueError(f"output_token_ids entry {int(t)} outside [0, {V})")
        s.accept(list(range(B)), tok.to(logits.device))
    if step:
        s.advance(list(range(B)), step)
    return s


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Tokens = None,
    output_token_ids: Tokens = None,
    step: int = 0,
    eos_token_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits [B, V]``: int64 ``[B]`` on the logits' device.

    ``params`` is one :class:`SamplingParams` for every row or one per row. Penalties
    see ``prompt_token_ids`` and ``output_token_ids`` (per row). The random stream of
    a seeded row is keyed by its position ``len(output_token_ids[b]) + step``.
    """
    s = _sampler(logits, params, prompt_token_ids, output_token_ids, step, eos_token_ids)
    return s.sample(logits, list(range(logits.shape[0]))).token_ids


def processed_probs(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    *,
    prompt_token_ids: Tokens = None,
    output_token_ids: Tokens = None,
    eos_token_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """The processed distribution fp32 ``[B, V]`` that :func:`sample` draws from."""
    s = _sampler(logits, params, prompt_token_ids, output_token_ids, 0, eos_token_ids)
    return s.probs(logits, list(range(logits.shape[0])))
