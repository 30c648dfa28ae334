"""Custom logits processors (MAX's shape): callbacks that edit a step's logits before the
fused sampler.

- per request: ``new_context(..., logits_processors=[fn, ...])``, each called as
  ``fn(ProcessorInputs(logits, context, token_ids))`` with that request's logits rows;
- per generator: ``TokenGenerator(batch_logits_processors=[fn, ...])``, called once per step
  as ``fn(BatchProcessorInputs(logits, logit_offsets, context_batch, token_ids))``.

They edit ``logits`` (fp32) in place. A processor with ``argmax_invariant = True`` (it never
changes which token is largest) is skipped for greedy requests. transformers'
``LogitsProcessor`` objects run through :class:`HFLogitsProcessor`, which passes them the
request's ``input_ids`` (prompt and generated tokens). The sampler then draws from the edited
logits, so reported logprobs are those of the edited logits.

May call: nothing in decodekit below the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchProcessorInputs", "HFLogitsProcessor", "ProcessorInputs", "apply_processors",
           "check_processors"]


@dataclass
class ProcessorInputs:
    """One request's share of a step. ``logits [n, V]`` fp32 (edit in place; ``n`` is 1 in a
    plain step); ``context`` the request; ``token_ids`` its prompt and generated tokens up to
    the row being sampled (tokens of the current call included)."""

    logits: torch.Tensor
    context: Any
    token_ids: list[int]


@dataclass
class BatchProcessorInputs:
    """A whole step. ``logits [N, V]`` fp32 (edit in place); request ``b`` owns rows
    ``logit_offsets[b] : logit_offsets[b + 1]`` (``[B + 1]`` ints); ``context_batch`` and
    ``token_ids`` per request, as in :class:`ProcessorInputs`."""

    logits: torch.Tensor
    logit_offsets: list[int]
    context_batch: list[Any]
    token_ids: list[list[int]]


class HFLogitsProcessor:
    """A transformers ``LogitsProcessor`` as a per-request processor: called with the request's
    ``input_ids [1, T]`` (prompt + generated) and its logits row, as ``model.generate`` does.
    ``argmax_invariant``: declare it never changes the argmax (skipped for greedy rows)."""

    def __init__(self, processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 argmax_invariant: bool = False) -> None:
        if not callable(processor):
            raise ValueError(f"HFLogitsProcessor needs a callable LogitsProcessor, got "
                             f"{type(processor).__name__}")
        self.processor = processor
        self.argmax_invariant = argmax_invariant

    def __call__(self, inputs: ProcessorInputs) -> None:
        ids = torch.tensor([inputs.token_ids], dtype=torch.long, device=inputs.logits.device)
        out = self.processor(ids, inputs.logits)
        if out is not inputs.logits:
            inputs.logits.copy_(out)

    def __repr__(self) -> str:
        return f"HFLogitsProcessor({self.processor!r})"


def check_processors(name: str, processors: Any) -> tuple[Callable, ...]:
    """``processors`` (None or a sequence of callables) as a tuple; ``ValueError`` naming ``name``."""
    if processors is None:
        return ()
    if callable(processors) or not isinstance(processors, Sequence):
        raise ValueError(f"{name} must be a list of callables, got {type(processors).__name__}")
    for i, p in enumerate(processors):
        if not callable(p):
            raise ValueError(f"{name}[{i}] must be callable, got {type(p).__name__}")
    return tuple(processors)


def apply_processors(logits: torch.Tensor, contexts: Sequence[Any], token_ids: Sequence[list[int]],
                     batch_processors: Sequence[Callable]) -> torch.Tensor:
    """Run every request's processors on its row of ``logits [B, V]``, then the batch
    processors; returns the edited fp32 logits (a copy: the model's stay as they were)."""
    x = logits.float().clone()
    for b, ctx in enumerate(contexts):
        greedy = ctx.params.is_greedy
        for fn in ctx.logits_processors:
            if greedy and getattr(fn, "argmax_invariant", False):
                continue
            fn(ProcessorInputs(x[b:b + 1], ctx, token_ids[b]))
    if batch_processors:
        inputs = BatchProcessorInputs(x, list(range(len(contexts) + 1)), list(contexts), list(token_ids))
        all_greedy = all(c.params.is_greedy for c in contexts)
        for fn in batch_processors:
            if not (all_greedy and getattr(fn, "argmax_invariant", False)):
                fn(inputs)
    return x
