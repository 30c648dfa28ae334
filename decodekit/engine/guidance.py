"""Guided decoding in the generator's step loop: grammars per request, the batch bitmask,
and the matchers kept in step with the sampled tokens.

The generator asks :class:`Guidance` for a request's :class:`~decodekit.structured.grammar.Guide`
at ``new_context`` (the spec is compiled there, so a bad one is a ``ValueError`` before the
request exists), for the bitmask of a batch just before sampling, and hands it the sampled
tokens. The matchers live on the host, so a plain step's tokens are taken *later*
(:meth:`Guidance.accept_later`): they are copied to pinned host memory behind the sampling
kernel, and the matchers read them only when the next mask is needed, which is after the
next forward has been enqueued. On a GPU the wait for tokens t, the matchers' accept of
them and the fill of mask t+1 all overlap forward t+1 (the copy's event covers sampling t
only, not the forward queued behind it). The price: a row whose grammar ended with token t
is only known to have ended after forward t+1 was enqueued; it takes part in that step and
its extra token is dropped at commit (:meth:`Guidance.stop_index`).

May call: :mod:`decodekit.structured` (grammars, matchers, the bitmask buffer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        cuda = device.type == "cuda"
        # a step's sampled tokens on the host (pinned: the copy does not block) and the event
        # after that copy; ``_later``: the guides those tokens belong to, not yet accepted
        self._tokens = torch.empty(max_rows, dtype=torch.int64, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None
        self._later: list[Guide | None] | None = None

    def guide(self, spec: GuidedDecodingParams | None) -> Guide | None:
        """A new matcher for a request with ``spec`` (None without one)."""
        if spec is None:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self._tokenizer, self._vocab, self._eos)
        return self._grammars.guide(spec)

    def mask(self, guides: Sequence[Guide | None]) -> torch.Tensor | None:
        """The bitmask of rows with these guides (None when none is guided), after the tokens
        taken :meth:`accept_later`. A row whose grammar has ended allows every token (its
        token is past the request's end and dropped at commit)."""
        if all(g is None for g in guides):
            return None
        self.flush()
        if self._masks is None:
            self._masks = BitmaskBuffer(self._vocab, self._max_rows, self._device)
        return self._masks.fill([g if g is not None and not g.terminated else None for g in guides])

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
        self.flush()
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

    def forced(self, guides: Sequence[Guide | None], limits: Sequence[int]) -> list[list[int]]:
        """Jump-forward: per row, tokens that spell the text its grammar forces next
        (xgrammar's ``find_jump_forward_tokens``), at most ``limits[r]``; empty for unguided
        rows. They become point-mass drafts, verified like any draft (so the output
        distribution is unchanged); a token its grammar is sure of is accepted outright."""
        self.flush()
        return [g.forced_tokens()[:limit] if g is not None and limit > 0 else []
                for g, limit in zip(guides, limits, strict=True)]

    def accept_later(self, guides: Sequence[Guide | None], token_ids: torch.Tensor) -> None:
        """Take a plain step's sampled tokens (``token_ids [B]`` on the device) for the guided
        rows, without waiting for them: a non-blocking copy to the host now, the matchers'
        accept at the next :meth:`flush` (which every other method here does first)."""
        if all(g is None for g in guides):
            return
        self.flush()
        n = len(guides)
        if n > self._tokens.shape[0]:
            raise ValueError(f"{n} rows but the guided-decoding buffers hold {self._tokens.shape[0]}")
        self._tokens[:n].copy_(token_ids, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._later = list(guides)

    def flush(self) -> None:
        """Accept the tokens taken :meth:`accept_later` (a wait for their copy only)."""
        if self._later is None:
            return
        guides, self._later = self._later, None
        if self._copied is not None:
            self._copied.synchronize()
        self.accept(guides, self._tokens[: len(guides)].tolist())

    def accept(self, guides: Sequence[Guide | None],
               token_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Advance each guided row's matcher past its sampled token (``token_ids [B]``) or
        tokens (a list per row: a speculative step's emitted tokens), now."""
        if all(g is None for g in guides):
            return
        self.flush()
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        for g, ts in zip(guides, rows, strict=True):
            for t in ([ts] if isinstance(ts, int) else ts):
                if g is not None and not g.terminated:
                    g.accept(t)

    def marks(self, guides: Sequence[Guide | None]) -> dict[Guide, tuple[int, bool]]:
        """Where each matcher stands now (tokens accepted, dead), for :meth:`undo` and
        :meth:`stop_index`."""
        self.flush()
        return {g: (g.accepted, g.dead) for g in guides if g is not None}

    def undo(self, marks: Mapping[Guide, tuple[int, bool]]) -> None:
        """Roll every matcher back to its mark (a failed call); tokens not yet accepted are
        dropped."""
        self._later = None
        for g, (n, dead) in marks.items():
            g.rollback(g.accepted - n)
            g.dead = dead

    def stop_index(self, guide: Guide | None, mark: tuple[int, bool] | None) -> int | None:
        """Where in a call's tokens a request's grammar ended (the index of its last token),
        given the ``mark`` taken at the call's start; None if it has not ended. The tokens
        after it (at most one: a step enqueued before the end was known) are not output."""
        self.flush()
        if guide is None or mark is None or not guide.terminated:
            return None
        n = guide.accepted - mark[0]
        # a dead end (fill_or_end) ends with an EOS the matcher never takes; a complete
        # grammar ends with the stop token it accepted
        return n if guide.dead and not mark[1] else n - 1

