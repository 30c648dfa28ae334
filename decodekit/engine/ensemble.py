"""Model ensembles: several LMs over one vocabulary sampled as one distribution.

:class:`Ensemble` is the user's configuration (the extra member models, weights, how to
combine); :class:`EnsembleMembers` runs the members next to the generator's target, each on
its own :class:`~decodekit.engine.runner.ModelRunner` with a static slot KV cache kept in
lock-step with the target's slots (same prefills, same decode steps, same forks), and
combines the logits of a step:

- ``mixture``: ``log sum_m w_m softmax(l_m)`` (the weights normalised to sum to 1);
- ``product``: ``sum_m w_m log_softmax(l_m)`` (a product of experts; the sampler's softmax
  normalises it).

The combined row replaces the target's logits; the request's own penalties, temperature and
filters then apply in the sampler, and raw logprobs are those of the combination.

May call: :mod:`.runner`, :mod:`.model_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .model_adapter import ModelAdapter
from .runner import ModelRunner, Rows

__all__ = ["Ensemble", "EnsembleMembers", "combine_logits"]

COMBINES = ("mixture", "product")


def combine_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor, combine: str) -> torch.Tensor:
    """The ensemble's logits fp32 ``[R, V]`` from each model's ``logits[m] [R, V]`` (the
    target first), ``weights`` fp32 ``[M]`` on their device, ``combine`` in :data:`COMBINES`."""
    lsm = torch.stack([torch.log_softmax(x.float(), -1) for x in logits])  # [M, R, V]
    w = weights[:, None, None]
    if combine == "mixture":
        return torch.logsumexp(lsm + w.log(), 0)
    return (lsm * w).sum(0)


class Ensemble:
    """Sample from the target combined with ``members`` (transformers causal LMs over the
    target's vocabulary, any architecture).

    Parameters
    ----------
    members : Sequence[torch.nn.Module]
        The models besides the generator's own (at least one).
    weights : Sequence[float] or None
        One finite positive weight per model, the target first (``len(members) + 1``);
        default: equal. ``mixture`` normalises them to sum to 1.
    combine : {"mixture", "product"}
        See the module docstring.
    """

    def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float] | None = None,
                 combine: str = "mixture") -> None:
        if isinstance(members, torch.nn.Module) or not isinstance(members, Sequence) or not members:
            raise ValueError("Ensemble members must be a non-empty list of transformers models")
        for i, m in enumerate(members):
            if not isinstance(m, torch.nn.Module) or not hasattr(m, "config"):
                raise ValueError(f"Ensemble members[{i}] must be a transformers model, got "
                                 f"{type(m).__name__}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be 'mixture' or 'product', got {combine!r}")
        n = len(members) + 1
        w = [1.0] * n if weights is None else [float(x) for x in weights]
        if len(w) != n or not all(math.isfinite(x) and x > 0 for x in w):
            raise ValueError(f"weights must be {n} finite positive numbers (the target first), got "
                             f"{weights!r}")
        if combine == "mixture":
            w = [x / sum(w) for x in w]
        self.members, self.weights, self.combine = list(members), w, combine

    def build(self, target: ModelRunner, vocab_size: int, tokenizer: Any) -> EnsembleMembers:
        """Runners for the members beside ``target`` (its device, dtype, slots and length)."""
        runners = []
        for i, m in enumerate(self.members):
            adapter = ModelAdapter(m, tokenizer, target.device, target.dtype)
            if adapter.vocab_size != vocab_size:
                raise ValueError(f"Ensemble members[{i}] has a vocabulary of {adapter.vocab_size}, the "
                                 f"target {vocab_size}: members must share the target's vocabulary")
            adapter.self_test()
            runners.append(ModelRunner(adapter, target.max_slots, target.max_seq_len, steering=False))
        return EnsembleMembers(runners, self.weights, self.combine)

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.members)
        return f"Ensemble([{names}], weights={self.weights}, combine={self.combine!r})"


class EnsembleMembers:
    """The members' runners, driven in lock-step with the target's slots."""

    def __init__(self, runners: list[ModelRunner], weights: list[float], combine: str) -> None:
        self.runners, self.combine = runners, combine
        # uploaded once: the per-step combination copies nothing from the host
        self.weights = torch.tensor(weights, dtype=torch.float32, device=runners[0].device)

    def prefill(self, target_logits: torch.Tensor, prompts: Sequence[Sequence[int]], first_slot: int
                ) -> torch.Tensor:
        """Prefill every member like the target (whole prompts: the members cache no prefix);
        the combined logits ``[R, V]`` of the prompts' last tokens."""
        rows = [r.prefill(prompts, first_slot) for r in self.runners]
        return combine_logits([target_logits, *rows], self.weights, self.combine)

    def decode(self, target: Rows, slots: Sequence[int], lengths: Sequence[int]) -> Rows:
        """One decode step of every member; the target's rows with the combined logits."""
        rows = [r.decode(slots, lengths).logits for r in self.runners]
        return Rows(combine_logits([target.logits, *rows], self.weights, self.combine), target.index,
                    target.index32)

    def set_last_tokens(self, slots: torch.Tensor | slice, tokens: torch.Tensor) -> None:
        for r in self.runners:
            r.set_last_tokens(slots, tokens)

    def fork(self, parent: int, child: int) -> None:
        for r in self.runners:
            r.fork(parent, child)

    def enable_graphs(self, capture: Any = None) -> None:
        for r in self.runners:
            r.enable_graphs(capture)
