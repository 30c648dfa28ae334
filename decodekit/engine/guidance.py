"""Guided decoding in the generator's step loop: grammars per request, the batch bitmask,
and the matchers kept in step with the sampled tokens.

The generator asks :class:`Guidance` for a request's :class:`~decodekit.structured.grammar.Guide`
at ``new_context`` (the spec is compiled there, so a bad one is a ``ValueError`` before the
request exists), for the bitmask of a batch just before sampling (after the forward is
enqueued: on a GPU the host work overlaps it), and hands it the sampled tokens right after
(one host read per step while a guided row runs: xgrammar's matchers live on the host).

May call: :mod:`decodekit.structured` (grammars, matchers, the bitmask buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..structured.grammar import Grammars, Guide
from ..structured.masks import BitmaskBuffer
from ..structured.spec import GuidedDecodingParams

__all__ = ["Guidance"]


class Guidance:
    """A generator's guided-decoding state: ``tokenizer``, the model's ``vocab_size`` and
    ``eos_token_ids`` (what ends a complete grammar); buffers for ``max_rows`` rows on
    ``device``. The grammar compiler is built on the first guided request."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int], max_rows: int,
                 device: torch.device) -> None:
        self._tokenizer, self._vocab, self._eos = tokenizer, vocab_size, list(eos_token_ids)
        self._max_rows, self._device = max_rows, device
        self._grammars: Grammars | None = None
        self._masks: BitmaskBuffer | None = None
        self._window_masks: BitmaskBuffer | None = None

    def guide(self, spec: GuidedDecodingParams | None) -> Guide | None:
        """A new matcher for a request with ``spec`` (None without one)."""
        if spec is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self._tokenizer, self._vocab, self._eos)
        return self._grammars.guide(spec)

    def mask(self, guides: Sequence[Guide | None]) -> torch.Tensor | None:
        """The bitmask of rows with these guides (None when none is guided)."""
        if all(g is None for g in guides):
            return None
        if self._masks is None:
            self._masks = BitmaskBuffer(self._vocab, self._max_rows, self._device)
        return self._masks.fill(guides)

    def window(self, guides: Sequence[Guide | None], drafts: torch.Tensor, lengths: Sequence[int]
               ) -> tuple[torch.Tensor | None, list[int]]:
        """Masks of a speculative window and its drafts cut to what each grammar allows.

        ``drafts [R, K]`` (the device tensor, -1 past ``lengths[r]``). For a guided row the
        drafts are walked in its matcher: the window mask row ``r * (K + 1) + j`` holds what
        may follow ``drafts[r, :j]``; the walk stops at the first draft the grammar refuses or
        that would complete it (the target then draws that position itself), and the matcher
        is rolled back. Returns ``(mask int32 [R * (K + 1), W] or None, new lengths)``."""
        if all(g is None for g in guides):
            return None, list(lengths)
        R, K = drafts.shape
        n = R * (K + 1)
        if self._window_masks is None or self._window_masks.rows < n:
            self._window_masks = BitmaskBuffer(self._vocab, max(n, self._max_rows), self._device)
        host, toks, cut = self._window_masks.host_rows(n), drafts.tolist(), list(lengths)
        for r, g in enumerate(guides):
            if g is None:
                continue
            ok = 0
            for j in range(K + 1):
                if not g.fill(host, r * (K + 1) + j):  # a dead end: no draft leads into it
                    if j == 0:
                        g.fill_or_end(host, r * (K + 1))
                    else:  # (that position is past the cut drafts: any mask will do)
                        host[r * (K + 1) + j].fill_(-1)
                        g.rollback(1)
                        ok -= 1
                    break
                if j >= lengths[r] or not g.try_accept(toks[r][j]):
                    break
                ok += 1
                if g.terminated:  # the grammar's end: left for the target to draw
                    g.rollback(1)
                    ok -= 1
                    break
            g.rollback(ok)
            cut[r] = ok
        return self._window_masks.upload(n), cut

    @staticmethod
    def forced(guides: Sequence[Guide | None], limits: Sequence[int]) -> list[list[int]]:
        """Jump-forward: per row, tokens that spell the text its grammar forces next
        (xgrammar's ``find_jump_forward_tokens``), at most ``limits[r]``; empty for unguided
        rows. They become point-mass drafts, verified like any draft (so the output
        distribution is unchanged); a token its grammar is sure of is accepted outright."""
        return [g.forced_tokens()[:limit] if g is not None and limit > 0 else []
                for g, limit in zip(guides, limits, strict=True)]

    @staticmethod
    def accept(guides: Sequence[Guide | None], token_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Advance each guided row's matcher past its sampled token (``token_ids [B]``) or
        tokens (a list per row: a speculative step's emitted tokens)."""
        if all(g is None for g in guides):
            return
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        for g, ts in zip(guides, rows, strict=True):
            for t in ([ts] if isinstance(ts, int) else ts):
                if g is not None and not g.terminated:
                    g.accept(t)

    @staticmethod
    def marks(guides: Sequence[Guide | None]) -> list[tuple[Guide, int]]:
        """Where each matcher stands now, for :meth:`undo`."""
        return [(g, g.accepted) for g in guides if g is not None]

    @staticmethod
    def undo(marks: Sequence[tuple[Guide, int]]) -> None:
        """Roll every matcher back to its mark (a failed call)."""
        for g, n in marks:
            g.rollback(g.accepted - n)

