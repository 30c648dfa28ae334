"""Prompt lookup: :class:`NGramDraft` proposes, for each request, the continuation of the
most recent earlier occurrence of its last ``n`` tokens in its own prompt and output.

It has no distribution: the verifier treats each proposal as a point mass, which keeps the
output distribution exactly the target's. Drafting is host work over the request's tokens:
per request an index of its n-grams (their latest start), extended as tokens arrive, so a
lookup costs O(n) whatever the context length (:meth:`NGramDraft.propose` is the plain scan
it must agree with).
May call: :mod:`.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import int_at_least
from .base import DraftRequest, Drafts

__all__ = ["MAX_AGREEMENT", "PROBE_AGREEMENT", "NGramDraft", "NGramIndex"]

MAX_AGREEMENT = 32  # how far back a match is extended
PROBE_AGREEMENT = 8  # a request resting from rejected drafts drafts again on a match this long


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


class NGramIndex:
    """The latest start of every ``m``-gram (``min_n <= m <= n``) of a growing token list,
    counting only the n-grams that end before its last token (so a continuation exists).

    :meth:`propose` equals :meth:`NGramDraft.propose` on the same tokens.
    """

    def __init__(self, config: NGramDraft) -> None:
        self.config = config
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.tables: dict[int, dict[tuple[int, ...], int]] = {
            m: {} for m in range(self.config.min_n, self.config.n + 1)}

    def extend(self, tokens: Sequence[int]) -> None:
        """Bring the index to ``tokens``, which must start with the tokens indexed so far
        (else it is rebuilt from scratch)."""
        L0 = len(self.tokens)
        if len(tokens) < L0 or list(tokens[:L0]) != self.tokens:  # a C-speed compare
            self._reset()  # not a continuation: start again
            L0 = 0
        own = self.tokens
        own.extend(tokens[L0:])
        # n-grams ending at index e (<= len - 2) become eligible once token e + 1 exists
        for e in range(max(0, L0 - 1), len(own) - 1):
            for m, table in self.tables.items():
                if e + 1 >= m:
                    table[tuple(own[e + 1 - m: e + 1])] = e + 1 - m

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (a call undone)."""
        if length < len(self.tokens):
            tokens = self.tokens[:length]
            self._reset()
            self.extend(tokens)

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens following the latest earlier match of the longest suffix."""
        return self.match(k)[0]

    def match(self, k: int) -> tuple[list[int], int]:
        """``(propose(k), agreement)``: the agreement is how many of the last tokens equal the
        tokens before the continuation's source (the matched n-gram extended backwards, at most
        :data:`MAX_AGREEMENT`; 0 without a match). A long agreement means the request is
        copying that source."""
        own, L = self.tokens, len(self.tokens)
        k = min(k, self.config.k)
        if k <= 0 or L < 2:
            return [], 0
        for m in range(min(self.config.n, L - 1), self.config.min_n - 1, -1):
            i = self.tables[m].get(tuple(own[L - m:]))
            if i is not None:
                a = m
                while a < MAX_AGREEMENT and i - (a - m) - 1 >= 0 and own[i - (a - m) - 1] == own[L - a - 1]:
                    a += 1
                return own[i + m: i + m + k], a
        return [], 0


class _NGramDrafter:
    """Prompt lookup for a batch: an :class:`NGramIndex` per slot, host proposals, one upload."""

    cost = 0.0

    def __init__(self, config: NGramDraft, device: torch.device) -> None:
        self.config, self.device = config, device
        self.index: dict[int, NGramIndex] = {}

    def admit(self, slots, prompts, steering) -> None:
        for s, p in zip(slots, prompts, strict=True):
            self.index[s] = NGramIndex(self.config)
            self.index[s].extend(p)

    def release(self, slot: int) -> None:
        self.index.pop(slot, None)

    def enable_graphs(self, capture=None) -> None:
        """Nothing to capture: lookup runs on the host."""

    def truncate(self, slot: int, length: int) -> None:
        if slot in self.index:
            self.index[slot].truncate(length)

    def committed(self, requests, accepted, window) -> None:
        pass

    def confident(self, slot: int, tokens: Sequence[int]) -> bool:
        """Whether the request is copying: its last :data:`PROBE_AGREEMENT` tokens or more
        recur earlier with a continuation (a resting request drafts again)."""
        return self._index(slot, tokens).match(1)[1] >= PROBE_AGREEMENT

    def _index(self, slot: int, tokens: Sequence[int]) -> NGramIndex:
        index = self.index.get(slot)
        if index is None:
            index = self.index[slot] = NGramIndex(self.config)
        index.extend(tokens)
        return index

    def _draft(self, r: DraftRequest) -> list[int]:
        if r.budget <= 0:
            return []
        return self._index(r.slot, r.tokens).propose(r.budget)

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        drafts = [self._draft(r) for r in requests]
        K = max(len(d) for d in drafts)
        if K == 0:
            return None
        pad = torch.full((len(requests), K), -1, dtype=torch.long)
        for r, d in enumerate(drafts):
            pad[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        return Drafts(pad.to(self.device), [len(d) for d in drafts], None)
