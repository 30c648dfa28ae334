"""Prompt lookup: :class:`NGramDraft` proposes, for each request, the continuation of an
earlier occurrence of its last ``n`` tokens (or fewer) in its own prompt and output.

Which occurrence: a request that is copying (a text to repeat, fix or reformat) walks through
its source, so the drafter keeps an *anchor* per request, the source position it expects to
copy from next (where its last draft whose first token was accepted came from, advanced by
the tokens emitted since: a rejected guess from another passage does not move it), and takes
the occurrence whose continuation lies nearest to it (within ``[-BACK, +AHEAD]``
tokens); without an anchor or a nearby occurrence, the latest one. After a correction the
model emits tokens that are not in the source; the nearest occurrence of the next short
suffix (" the") is then the one in the passage being copied, where the latest may be
anywhere.

It has no distribution: the verifier treats each proposal as a point mass, which keeps the
output distribution exactly the target's. Drafting is host work over the request's tokens:
per request an index of its n-grams (their starts, ascending), extended as tokens arrive, so
a lookup costs O(n log m) whatever the context length (:meth:`NGramDraft.propose` is the plain
scan it must agree with).
May call: :mod:`.base`.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import int_at_least
from .base import DraftRequest, Drafts

__all__ = ["AHEAD", "BACK", "CONFIDENT_AGREEMENT", "MAX_AGREEMENT", "Match", "NGramDraft", "NGramIndex"]

MAX_AGREEMENT = 32  # how far back a match is extended
CONFIDENT_AGREEMENT = 4  # a match agreeing this far back: the request is copying its source
BACK, AHEAD = 8, 64  # an anchored lookup takes continuations within [anchor - BACK, anchor + AHEAD]


def pick(starts: Sequence[int], anchor: int | None, offset: int = 0) -> int:
    """Of ascending occurrence ``starts`` (a continuation begins ``offset`` tokens after each),
    the continuation nearest to ``anchor`` within ``[anchor - BACK, anchor + AHEAD]`` (ties:
    the later), else the latest."""
    if anchor is not None:
        lo = bisect.bisect_left(starts, anchor - BACK - offset)
        hi = bisect.bisect_right(starts, anchor + AHEAD - offset)
        if lo < hi:
            return min((starts[i] + offset for i in range(lo, hi)), key=lambda c: (abs(c - anchor), -c))
    return starts[-1] + offset


@dataclass(frozen=True)
class Match:
    """A lookup's answer: the proposed ``tokens``, the continuation's start ``source`` in the
    request's tokens (-1: none), and the ``agreement``: how many of the last tokens equal the
    tokens before ``source`` (at most :data:`MAX_AGREEMENT`; 0 without a match)."""

    tokens: list[int]
    source: int = -1
    agreement: int = 0


def agreement(tokens: Sequence[int], source: int) -> int:
    """How many of the last ``tokens`` equal those before ``source`` (at most
    :data:`MAX_AGREEMENT`)."""
    L, a = len(tokens), 0
    while a < MAX_AGREEMENT and source - a - 1 >= 0 and tokens[source - a - 1] == tokens[L - a - 1]:
        a += 1
    return a


class NGramDraft:
    """Prompt-lookup drafter.

    Parameters
    ----------
    n : int
        Longest suffix to match (tries ``n`` down to ``min_n`` tokens).
    k : int
        Most tokens proposed per step (the draft policy picks how many, up to this).
    min_n : int
        Shortest suffix worth matching.
    """

    def __init__(self, n: int = 3, k: int = 16, min_n: int = 1) -> None:
        for name, v in (("n", n), ("k", k), ("min_n", min_n)):
            int_at_least(f"NGramDraft {name}", v, 1)
        if min_n > n:
            raise ValueError(f"NGramDraft min_n ({min_n}) must be <= n ({n})")
        self.n, self.k, self.min_n = n, k, min_n

    def propose(self, tokens: Sequence[int], k: int | None = None, anchor: int | None = None) -> list[int]:
        """Up to ``k`` tokens following an earlier occurrence of the longest suffix (``n`` down
        to ``min_n`` tokens) that has a continuation: the one nearest to ``anchor`` (see
        :func:`pick`), else the latest. The plain scan; :class:`NGramIndex` must agree."""
        return self.scan(tokens, k, anchor).tokens

    def scan(self, tokens: Sequence[int], k: int | None = None, anchor: int | None = None) -> Match:
        """:meth:`propose` with the match's source and agreement."""
        k = self.k if k is None else min(k, self.k)
        L = len(tokens)
        if k <= 0 or L < 2:
            return Match([])
        for n in range(min(self.n, L - 1), self.min_n - 1, -1):
            suffix = list(tokens[L - n:])
            starts = [i for i in range(L - n) if list(tokens[i:i + n]) == suffix]
            if starts:
                c = pick(starts, anchor, n)
                return Match(list(tokens[c: c + k]), c, agreement(tokens, c))
        return Match([])

    def __repr__(self) -> str:
        return f"NGramDraft(n={self.n}, k={self.k}, min_n={self.min_n})"

    def build(self, runner: Any, sampler: Any) -> _NGramDrafter:
        """The :class:`~decodekit.speculative.base.Drafter` for a generator (lookup needs
        neither the model nor the sampler, only the device)."""
        return _NGramDrafter(self, runner.device)


class NGramIndex:
    """The starts of every ``m``-gram (``min_n <= m <= n``) of a growing token list, ascending,
    counting only the n-grams that end before its last token (so a continuation exists).

    :meth:`match` equals :meth:`NGramDraft.scan` on the same tokens.
    """

    def __init__(self, config: NGramDraft) -> None:
        self.config = config
        self._reset()

    def _reset(self) -> None:
        self.tokens: list[int] = []
        self.tables: dict[int, dict[tuple[int, ...], list[int]]] = {
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
                    table.setdefault(tuple(own[e + 1 - m: e + 1]), []).append(e + 1 - m)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (a call undone)."""
        if length < len(self.tokens):
            tokens = self.tokens[:length]
            self._reset()
            self.extend(tokens)

    def propose(self, k: int, anchor: int | None = None) -> list[int]:
        """Up to ``k`` tokens: :meth:`NGramDraft.propose` of the indexed tokens."""
        return self.match(k, anchor).tokens

    def match(self, k: int, anchor: int | None = None) -> Match:
        """:meth:`NGramDraft.scan` of the indexed tokens: the proposal, its source and its
        agreement (a long agreement means the request is copying that source)."""
        own, L = self.tokens, len(self.tokens)
        k = min(k, self.config.k)
        if k <= 0 or L < 2:
            return Match([])
        for m in range(min(self.config.n, L - 1), self.config.min_n - 1, -1):
            starts = self.tables[m].get(tuple(own[L - m:]))
            if starts:
                c = pick(starts, anchor, m)
                return Match(own[c: c + k], c, agreement(own, c))
        return Match([])


class _NGramDrafter:
    """Prompt lookup for a batch: an :class:`NGramIndex` and an anchor per slot, host
    proposals, one upload."""

    cost = 0.0
    prior = (0.15, 0.8)  # acceptance before any evidence: a first token rarely, then a run

    def __init__(self, config: NGramDraft, device: torch.device) -> None:
        self.config, self.device = config, device
        self.index: dict[int, NGramIndex] = {}
        self.anchors: dict[int, tuple[int, int]] = {}  # slot -> (source, tokens then)
        self._sources: dict[int, tuple[int, int]] = {}  # slot -> this step's draft's (source, tokens)
        self._last: dict[int, tuple[int, int | None, Match]] = {}  # slot -> this step's lookup

    def admit(self, slots, prompts, steering) -> None:
        for s, p in zip(slots, prompts, strict=True):
            self.index[s] = NGramIndex(self.config)
            self.index[s].extend(p)
            self.anchors.pop(s, None)
            self._last.pop(s, None)

    def release(self, slot: int) -> None:
        self.index.pop(slot, None)
        self.anchors.pop(slot, None)
        self._sources.pop(slot, None)
        self._last.pop(slot, None)

    def enable_graphs(self, capture=None) -> None:
        """Nothing to capture: lookup runs on the host."""

    def truncate(self, slot: int, length: int) -> None:
        if slot in self.index:
            self.index[slot].truncate(length)
        self._last.pop(slot, None)
        anchor = self.anchors.get(slot)
        if anchor is not None and anchor[1] > length + 1:
            del self.anchors[slot]

    def committed(self, requests, accepted, window) -> None:
        """A draft whose first token was accepted anchors its request at its source; a
        rejected one anchors only a request without an anchor (a correction right where the
        copy stands), never moves one: a guess from elsewhere (a one-token match in another
        line) must not drag the next lookups to the passage it came from."""
        for r, a in zip(requests, accepted, strict=True):
            src = self._sources.pop(r.slot, None)
            if src is not None and (a > 0 or r.slot not in self.anchors):
                self.anchors[r.slot] = src
        self._sources.clear()

    def _anchor(self, slot: int, tokens: Sequence[int]) -> int | None:
        """Where the request should be copying from now: its last draft's source advanced by
        the tokens since (a rejected first token counts as one source token replaced)."""
        a = self.anchors.get(slot)
        return None if a is None else a[0] + len(tokens) - a[1]

    def confident(self, slot: int, tokens: Sequence[int]) -> bool:
        """Whether the request is copying: its last :data:`CONFIDENT_AGREEMENT` tokens or
        more recur earlier with a continuation."""
        return self._match(slot, tokens).agreement >= CONFIDENT_AGREEMENT

    def evidence(self, slot: int, tokens: Sequence[int]) -> int:
        """The match's class: ``2 * min(agreement, CONFIDENT_AGREEMENT) - 1``, plus 1 when it
        continues the passage the request copies (within the anchor's window); 0 without a
        match. A one-token match elsewhere is a guess (its first token passes in 10-30% of
        steps on copy prompts); two or three agreeing tokens at the anchor pass far more often."""
        m = self._match(slot, tokens)
        if not m.tokens:
            return 0
        anchor = self._anchor(slot, tokens)
        near = anchor is not None and anchor - BACK <= m.source <= anchor + AHEAD
        return 2 * min(m.agreement, CONFIDENT_AGREEMENT) - 1 + int(near)

    def _match(self, slot: int, tokens: Sequence[int]) -> Match:
        """The lookup (up to ``k`` tokens) for the request's ``tokens``, once per step: the
        policy's :meth:`confident` and the step's proposal share it (which occurrence is taken
        does not depend on how many tokens are proposed)."""
        anchor = self._anchor(slot, tokens)
        last = self._last.get(slot)
        if last is not None and last[:2] == (len(tokens), anchor):
            return last[2]
        index = self.index.get(slot)
        if index is None:
            index = self.index[slot] = NGramIndex(self.config)
        index.extend(tokens)
        m = index.match(self.config.k, anchor)
        self._last[slot] = (len(tokens), anchor, m)
        return m

    def _draft(self, r: DraftRequest) -> list[int]:
        if r.budget <= 0:
            return []
        m = self._match(r.slot, r.tokens)
        if m.tokens:
            self._sources[r.slot] = (m.source, len(r.tokens))
        return m.tokens[: r.budget]

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        self._sources.clear()
        drafts = [self._draft(r) for r in requests]
        K = max(len(d) for d in drafts)
        if K == 0:
            return None
        pad = torch.full((len(requests), K), -1, dtype=torch.long)
        for r, d in enumerate(drafts):
            pad[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        return Drafts(pad.to(self.device), [len(d) for d in drafts], None)
