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

Where the model departs from the source, the drafter reads what it wrote instead of the
rejected token (:meth:`_NGramDrafter._resync`): the token a few source tokens on (the model
left a span out: a list's line break and dash when it writes prose; such layout spans are
then skipped in that request's later drafts, while skipping them keeps being right), or,
with the tokenizer's token kinds, a word for a source word (a spelling fix: the copy resumes
at the next source word) or punctuation (an insertion: at the rejected token again); the next
draft then continues the source from there, where a suffix lookup would find nothing (the
corrected word is not in the source) or a guess elsewhere.

It has no distribution: the verifier treats each proposal as a point mass, which keeps the
output distribution exactly the target's. Drafting is host work over the request's tokens:
per request an index of its n-grams (their starts, ascending), extended as tokens arrive, so
a lookup costs O(n log m) whatever the context length (:meth:`NGramDraft.propose` is the plain
scan it must agree with).
May call: :mod:`.base`.
"""

from __future__ import annotations

import bisect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import int_at_least
from .base import DraftRequest, Drafts

__all__ = ["AHEAD", "BACK", "CONFIDENT_AGREEMENT", "MAX_AGREEMENT", "Match", "NGramDraft", "NGramIndex",
           "Skip"]

MAX_AGREEMENT = 32  # how far back a match is extended
CONFIDENT_AGREEMENT = 4  # a match agreeing this far back: the request is copying its source
BACK, AHEAD = 8, 64  # an anchored lookup takes continuations within [anchor - BACK, anchor + AHEAD]
MAX_SKIP = 3  # longest source span a request is seen to leave out
MAX_SKIPS = 4  # spans remembered per request (the latest)
MAX_WORD = 6  # tokens of a source word a correction may replace
RESYNC = 2 * CONFIDENT_AGREEMENT + 1  # evidence class of a draft from the anchor after a correction

# first-token acceptance of a match class (:meth:`_NGramDrafter.evidence`) before any evidence:
# agreement 1, 2, 3, 4+ tokens, elsewhere (odd) or continuing the copied passage (even); a
# one-token match takes the drafter's prior (0.15) wherever it is: in open text the anchor
# sits in the request's own recent output, where one-token matches are everywhere
EVIDENCE_PRIOR = {3: 0.2, 4: 0.3, 5: 0.35, 6: 0.6, 7: 0.8, 8: 0.9, RESYNC: 0.4}


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
    resync: bool = False  # the continuation at the anchor after a correction, not a suffix match


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
        adapter = getattr(runner, "adapter", None)
        tokenizer = getattr(adapter, "tokenizer", None)
        kinds = None if tokenizer is None else token_kinds(tokenizer, adapter.vocab_size)
        return _NGramDrafter(self, runner.device, kinds)


PART, WORD, MARK = 0, 1, 2  # token kinds: goes on a word, begins one, punctuation / space / other


_KINDS: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], list[int] | None]] = weakref.WeakKeyDictionary()


def token_kinds(tokenizer: Any, vocab: int) -> list[int] | None:
    """Per token id, by its text alone: :data:`WORD` when whitespace then a letter or digit,
    :data:`PART` when a letter or digit first, :data:`MARK` otherwise; None without a
    tokenizer that decodes token ids. Kept per tokenizer (a 49k vocabulary takes about a
    second to decode) while its size and ``vocab`` stay the same."""
    decode = getattr(tokenizer, "batch_decode", None)
    if decode is None:
        return None
    named = min(vocab, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab
    try:
        kept, keepable = _KINDS.get(tokenizer), True
    except TypeError:  # not weakly referenceable or not hashable: not kept
        kept, keepable = None, False
    if kept is not None and kept[0] == (vocab, named):
        return kept[1]
    kinds = _kinds(decode, vocab, named)
    if keepable:
        _KINDS[tokenizer] = ((vocab, named), kinds)
    return kinds


def _kinds(decode: Any, vocab: int, named: int) -> list[int] | None:
    try:
        texts = list(decode([[i] for i in range(named)])) + [""] * (vocab - named)  # padding rows: MARK
    except (TypeError, ValueError, IndexError, KeyError, OverflowError):
        return None
    kinds = []
    for t in texts:
        t = t if isinstance(t, str) else ""
        if t[:1].isspace():
            kinds.append(WORD if t[1:2].isalnum() else MARK)
        else:
            kinds.append(PART if t[:1].isalnum() else MARK)
    return kinds


@dataclass
class Skip:
    """A source span a request leaves out when it copies (learned from a rejection: the model
    wrote the token after the span instead of its first), and how often skipping it was right
    (``hits``: the token after it was accepted) or wrong (``misses``); used while
    ``hits >= misses``."""

    tokens: tuple[int, ...]
    hits: int = 0
    misses: int = 0


@dataclass
class _Draft:
    positions: list[int]  # source position of each drafted token
    length: int  # the request's tokens when it was drafted
    anchored: bool  # it continued the passage being copied
    resync: bool  # it was the anchor's continuation after a correction (Match.resync)
    skipped: list[tuple[int, Skip]]  # (draft position right after a skipped span, the skip)


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
    evidence_prior = EVIDENCE_PRIOR

    def __init__(self, config: NGramDraft, device: torch.device, kinds: list[int] | None = None) -> None:
        self.config, self.device, self.kinds = config, device, kinds
        self._resynced: set[int] = set()  # slots whose anchor was just placed after a correction
        self.index: dict[int, NGramIndex] = {}
        self.anchors: dict[int, tuple[int, int]] = {}  # slot -> (source, tokens then)
        self.skips: dict[int, list[Skip]] = {}  # slot -> source spans the request leaves out
        self._drafts: dict[int, _Draft] = {}  # slot -> this step's draft
        self._pending: dict[int, tuple[int, int]] = {}  # slot -> a rejection: (source, emitted index)
        self._last: dict[int, tuple[int, int | None, Match]] = {}  # slot -> this step's lookup

    def admit(self, slots, prompts, steering) -> None:
        for s, p in zip(slots, prompts, strict=True):
            self.release(s)
            self.index[s] = NGramIndex(self.config)
            self.index[s].extend(p)

    def release(self, slot: int) -> None:
        for state in (self.index, self.anchors, self.skips, self._drafts, self._pending, self._last):
            state.pop(slot, None)
        self._resynced.discard(slot)

    def enable_graphs(self, capture=None) -> None:
        """Nothing to capture: lookup runs on the host."""

    def truncate(self, slot: int, length: int) -> None:
        if slot in self.index:
            self.index[slot].truncate(length)
        for state in (self._drafts, self._pending, self._last):
            state.pop(slot, None)
        self._resynced.discard(slot)
        anchor = self.anchors.get(slot)
        if anchor is not None and anchor[1] > length + 1:
            del self.anchors[slot]

    def committed(self, requests, accepted, window) -> None:
        """A draft whose first token was accepted anchors its request at its source; a
        rejected one anchors only a request without an anchor (a correction right where the
        copy stands), never moves one: a guess from elsewhere (a one-token match in another
        line) must not drag the next lookups to the passage it came from. A rejection in the
        passage being copied is remembered: the next lookup sees what the model wrote instead
        (:meth:`_resync`). A learned skip inside the draft scores a hit when the token after it
        was accepted, a miss when that token was the one rejected."""
        for r, a in zip(requests, accepted, strict=True):
            d = self._drafts.pop(r.slot, None)
            if d is None:
                continue
            self._resynced.discard(r.slot)
            for at, skip in d.skipped:
                skip.hits += a > at
                skip.misses += a == at
            copying = a > 0 or (d.anchored and not d.resync)
            if copying or r.slot not in self.anchors:
                if a < len(d.positions):
                    if copying:
                        self._pending[r.slot] = (d.positions[a], d.length + a)
                    self.anchors[r.slot] = (d.positions[a], d.length + a)
                else:
                    self.anchors[r.slot] = (d.positions[-1] + 1, d.length + a)
        self._drafts.clear()

    def _resync(self, slot: int, tokens: Sequence[int]) -> None:
        """After a rejection at source position ``s`` in the copied passage, place the anchor by
        what the model wrote instead, ``t``:

        - ``t`` is one of the next :data:`MAX_SKIP` source tokens: the model left out the span
          before it (a list's "\\n-" when the list becomes prose); the anchor moves past it,
          and the request's drafts skip that span from now on (:class:`Skip`); ``t`` is the
          source token before ``s``: the anchor was one ahead;
        - else, with the tokenizer's token kinds (:func:`token_kinds`), where the source has a
          word at ``s``: ``t`` is a word (a corrected or replaced word): the copy resumes at
          the source's next word; ``t`` goes on the model's word or is punctuation (a longer
          correction, an insertion): at ``s`` again. The next lookup then drafts from the
          anchor (:meth:`_match`).
        """
        pending = self._pending.pop(slot, None)
        if pending is None or pending[1] >= len(tokens):
            return
        s, emitted = pending
        t = tokens[emitted]
        if t == tokens[s]:
            return
        if s > 0 and tokens[s - 1] == t:
            self.anchors[slot] = (s - 1, emitted)
            return
        for m in range(1, MAX_SKIP + 1):
            if s + m < emitted and tokens[s + m] == t:
                self.anchors[slot] = (s + m, emitted)
                self._learn_skip(slot, tuple(tokens[s: s + m]))
                return
        kinds = self.kinds
        if kinds is None or kinds[tokens[s]] != WORD:
            return
        if kinds[t] == WORD:
            end = min(s + 1 + MAX_WORD, emitted)
            nxt = next((j for j in range(s + 1, end) if kinds[tokens[j]] != PART), None)
            if nxt is None:
                return
            self.anchors[slot] = (nxt - 1, emitted)
        else:
            self.anchors[slot] = (s - 1, emitted)
        self._resynced.add(slot)

    def _learn_skip(self, slot: int, span: tuple[int, ...]) -> None:
        """Remember that the request left out ``span`` (layout only: with the tokenizer's
        token kinds, a span of punctuation, spaces and line breaks; a word left out once says
        nothing about the next occurrence of that word)."""
        if self.kinds is not None and any(self.kinds[x] != MARK for x in span):
            return
        skips = self.skips.setdefault(slot, [])
        known = next((k for k in skips if k.tokens == span), None)
        if known is None:
            skips.append(Skip(span))
            del skips[:-MAX_SKIPS]
        else:
            known.hits += 1

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
        if m.resync:
            return RESYNC
        anchor = self._anchor(slot, tokens)
        near = anchor is not None and anchor - BACK <= m.source <= anchor + AHEAD
        return 2 * min(m.agreement, CONFIDENT_AGREEMENT) - 1 + int(near)

    def available(self, slot: int, tokens: Sequence[int]) -> int:
        """0 without a match; else the tokens from the match's source to the newest, at most
        ``k`` (a match near the end of what the request has has little left to copy)."""
        m = self._match(slot, tokens)
        return min(self.config.k, len(tokens) - m.source) if m.tokens else 0

    def _match(self, slot: int, tokens: Sequence[int]) -> Match:
        """The lookup (up to ``k`` tokens) for the request's ``tokens``, once per step: the
        policy's :meth:`confident` and the step's proposal share it (which occurrence is taken
        does not depend on how many tokens are proposed)."""
        self._resync(slot, tokens)
        anchor = self._anchor(slot, tokens)
        last = self._last.get(slot)
        if last is not None and last[:2] == (len(tokens), anchor):
            return last[2]
        index = self.index.get(slot)
        if index is None:
            index = self.index[slot] = NGramIndex(self.config)
        index.extend(tokens)
        m = index.match(self.config.k, anchor)
        if slot in self._resynced and anchor is not None and m.source != anchor and 0 <= anchor < len(tokens):
            m = Match(list(tokens[anchor: anchor + self.config.k]), anchor, agreement(tokens, anchor), True)
        self._last[slot] = (len(tokens), anchor, m)
        return m

    def _draft(self, r: DraftRequest) -> list[int]:
        if r.budget <= 0:
            return []
        m = self._match(r.slot, r.tokens)
        if not m.tokens:
            return []
        own = self.index[r.slot].tokens
        live = [k for k in self.skips.get(r.slot, ()) if k.hits >= k.misses]
        positions, skipped, i = [], [], m.source
        while len(positions) < min(r.budget, self.config.k) and i < len(own):
            k = next((k for k in live if tuple(own[i: i + len(k.tokens)]) == k.tokens), None)
            if k is not None and i + len(k.tokens) < len(own):
                skipped.append((len(positions), k))
                i += len(k.tokens)
            positions.append(i)
            i += 1
        self._drafts[r.slot] = _Draft(positions, len(r.tokens), m.source == self._anchor(r.slot, r.tokens),
                                      m.resync, skipped)
        return [own[p] for p in positions]

    def propose(self, requests: Sequence[DraftRequest], lengths: Sequence[int]) -> Drafts | None:
        self._drafts.clear()
        drafts = [self._draft(r) for r in requests]
        K = max(len(d) for d in drafts)
        if K == 0:
            return None
        pad = torch.full((len(requests), K), -1, dtype=torch.long)
        for r, d in enumerate(drafts):
            pad[r, : len(d)] = torch.tensor(d, dtype=torch.long)
        return Drafts(pad.to(self.device), [len(d) for d in drafts], None)
