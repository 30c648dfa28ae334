"""Drafters for speculative decoding.

:class:`NGramDraft` (prompt lookup) proposes, for each request, the continuation of the
most recent earlier occurrence of its last ``n`` tokens in its own prompt and output.
It has no distribution: the verifier treats each proposal as a point mass, which keeps
the output distribution exactly the target's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["NGramDraft", "SpecStats"]


@dataclass
class SpecStats:
    """Speculation counters (per request and per generator), with the usual definitions."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # verification steps
    accepted_per_position: list[int] | None = None

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """1 + accepted / verification steps (tokens emitted per target forward)."""
        return 1.0 + self.accepted / self.steps if self.steps else 0.0

    def add(self, drafted: int, accepted: int, k: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.steps += 1
        if self.accepted_per_position is None or len(self.accepted_per_position) < k:
            old = self.accepted_per_position or []
            self.accepted_per_position = old + [0] * (k - len(old))
        for j in range(accepted):
            self.accepted_per_position[j] += 1


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
        for name, v, lo in (("n", n, 1), ("k", k, 1), ("min_n", min_n, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"NGramDraft {name} must be an int >= {lo}, got {v!r}")
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
