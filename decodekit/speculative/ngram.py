"""Prompt lookup: :class:`NGramDraft` proposes, for each request, the continuation of the
most recent earlier occurrence of its last ``n`` tokens in its own prompt and output.

It has no distribution: the verifier treats each proposal as a point mass, which keeps the
output distribution exactly the target's. Drafting is host work over the request's tokens.
May call: :mod:`.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import int_at_least
from .base import DraftRequest, Drafts

__all__ = ["NGramDraft"]


class NGramDraft:
    """Prompt-lookup drafter.

    Parameters
    ----------
    n : int
        Longest suffix to match (tries ``n`` down to ``min_n`` tokens).
    k : int
        Most tokens proposed per step.
    min_n : int
        Shortest suffix worth matching.
    """

    def __init__(self, n: int = 3, k: int = 4, min_n: int = 1) -> None:
        for name, v in (("n", n), ("k", k), ("min_n", min_n)):
            int_at_least(f"NGramDraft {name}", v, 1)
        if min_n > n:
            raise ValueError(f"NGramDraft min_n ({min_n}) must be <= n ({n})")
        self.n, self.k, self.min_n = n, k, min_n

    def propose(self, tokens: Sequence[int], k: int | None = None) -> list[int]:
        """Up to ``k`` tokens following the latest earlier match of the last ``n`` tokens."""
        k = self.k if k is None else min(k, self.k)
        L = len(tokens)
        if k <= 0 or L < 2:
            return []
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            suffix = list(tokens[L - n:])
            # latest start i < L - n with tokens[i:i+n] == suffix
            for i in range(L - n - 1, -1, -1):
                if tokens[i] == suffix[0] and list(tokens[i:i + n]) == suffix:
                    return list(tokens[i + n: i + n + k])
        return []

    def __repr__(self) -> str:
        return f"NGramDraft(n={self.n}, k={self.k}, min_n={self.min_n})"

    def build(self, runner: Any, sampler: Any) -> _NGramDrafter:
        """The :class:`~decodekit.speculative.base.Drafter` for a generator (lookup needs
        neither the model nor the sampler, only the device)."""
        return _NGramDrafter(self, runner.device)


class _NGramDrafter:
    """Prompt lookup for a batch: host proposals, one upload."""

    cost = 0.0

    def __init__(self, config: NGramDraft, device: torch.device) -> None:
        self.config, self.device = config, device

    def admit(self, slots, prompts, steering) -> None:
        pass

    def release(self, slot: int) -> None:
        pass

    def truncate(self, slot: int, length: int) -> None:
        pass

    def committed(self, requests, accepted, window) -> None:
        pass

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        drafts = [self.config.propose(r.tokens, r.budget) if r.budget > 0 else [] for r in requests]
        K = max(len(d) for d in drafts)
        if K == 0:
            return None
        pad = torch.full((len(requests), K), -1, dtype=torch.long)
        for r, d in enumerate(drafts):
            pad[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        return Drafts(pad.to(self.device), [len(d) for d in drafts], None)
