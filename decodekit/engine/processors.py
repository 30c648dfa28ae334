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

In a speculative step a request's processors get one row per window position (its newest
token and each draft), with the drafts appended to its ``token_ids``; the drafts are then
verified against the edited distributions, so the output is that of plain steps (greedy:
the same tokens).

May call: nothing in decodekit below the generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BatchProcessorInputs", "HFLogitsProcessor", "ProcessorInputs", "apply_processors",
           "apply_window_processors", "check_processors"]


@dataclass
class ProcessorInputs:
    """One request's share of a step. ``logits [n, V]`` fp32 (edit in place): ``n`` is 1 in a
    plain step and ``1 + d`` in a speculative window of ``d`` drafts; ``context`` the request;
    ``token_ids`` its prompt and generated tokens (those of the current call included) and,
    in a window, the drafts: row ``j`` of ``logits`` is the distribution of the token after
    ``token_ids[: len(token_ids) - n + 1 + j]``."""

    logits: torch.Tensor
    context: Any
    token_ids: list[int]


@dataclass
class BatchProcessorInputs:
    """A whole step. ``logits [N, V]`` fp32 (edit in place); request ``b`` owns rows
    ``logit_offsets[b] : logit_offsets[b + 1]`` (``[B + 1]`` ints: one row each in a plain
    step, one per window position in a speculative one); ``context_batch`` and
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
        n, T = inputs.logits.shape[0], len(inputs.token_ids)
        for j in range(n):  # row j follows token_ids[: T - n + 1 + j] (a window: one call per row)
            ids = torch.tensor([inputs.token_ids[: T - n + 1 + j]], dtype=torch.long,
                               device=inputs.logits.device)
            row = inputs.logits[j:j + 1]
            out = self.processor(ids, row)
            if out is not row:
                row.copy_(out)

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
    """Run every request's processors on its row of ``logits [B, V]`` (a plain step), then the
    batch processors; returns the edited fp32 logits (a copy: the model's stay as they were)."""
    return apply_window_processors(logits[:, None], contexts, token_ids, [[]] * len(contexts),
                                   batch_processors)[:, 0]


def apply_window_processors(logits: torch.Tensor, contexts: Sequence[Any], token_ids: Sequence[list[int]],
                            drafts: Sequence[list[int]], batch_processors: Sequence[Callable]
                            ) -> torch.Tensor:
    """The processors of a speculative window: ``logits [R, W, V]``, row ``r`` scoring its
    newest token and its ``drafts[r]`` (``len(drafts[r]) < W``; positions past them are
    padding, left as they are); ``token_ids[r]`` its tokens before the window. Each request's
    processors get its ``1 + len(drafts[r])`` rows, the batch processors all of them (offsets
    per request). Returns the edited fp32 logits ``[R, W, V]`` (a copy)."""
    R, W, V = logits.shape
    n = [1 + len(d) for d in drafts]
    out = logits.float().clone()
    flat = out.view(R * W, V)
    rows = [r * W + j for r in range(R) for j in range(n[r])]
    whole = len(rows) == R * W
    index = None if whole else torch.tensor(rows, device=logits.device)
    x = flat if whole else flat[index]  # (a gather: a copy)
    offsets = [0]
    for k in n:
        offsets.append(offsets[-1] + k)
    seen = [list(t) + list(d) for t, d in zip(token_ids, drafts, strict=True)]
    for b, ctx in enumerate(contexts):
        greedy = ctx.params.is_greedy
        for fn in ctx.logits_processors:
            if not (greedy and getattr(fn, "argmax_invariant", False)):
                fn(ProcessorInputs(x[offsets[b]:offsets[b + 1]], ctx, seen[b]))
    if batch_processors:
        inputs = BatchProcessorInputs(x, offsets, list(contexts), seen)
        all_greedy = all(c.params.is_greedy for c in contexts)
        for fn in batch_processors:
            if not (all_greedy and getattr(fn, "argmax_invariant", False)):
                fn(inputs)
    if not whole:
        flat[index] = x
    return out
