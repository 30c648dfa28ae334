"""One ``next_token`` call as a transaction: either all of its tokens reach the contexts,
or the sampler state, the runner's newest-token buffer, the contexts' lengths and the
drafter's caches go back to where they were when the call started.

A forward can fail part-way through a multi-step call (a transient out-of-memory error, a
``KeyboardInterrupt``). The tokens sampled before the failure are in the KV cache and in
the sampler state, but the caller never received them; without this, a retry would continue
as if they had been returned. With it, a retry samples them again: the randomness is keyed by
(seed, step), so a seeded, greedy or already-admitted request gets the very same tokens.

The KV cache itself needs nothing: positions past a row's length are masked and overwritten.

May call: the sampler (checkpoint / restore), the runner, the speculative step (its draft
policy counts and draft caches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .context import TextGenerationContext
from .pending import PendingTokens
from .runner import ModelRunner

__all__ = ["CallTransaction"]


class CallTransaction:
    """The state of ``contexts`` (admitted, slots assigned) at the start of a call."""

    def __init__(self, contexts: Sequence[TextGenerationContext], sampler: Any, runner: ModelRunner,
                 speculative: Any | None) -> None:
        self.contexts = list(contexts)
        self.sampler, self.runner, self.speculative = sampler, runner, speculative
        self.lengths = [c.length for c in self.contexts]
        slots = [c.slot for c in self.contexts]
        self.checkpoint = sampler.checkpoint(slots) if slots else None
        self.idx = runner.upload(slots) if slots else None
        self.last = None if self.idx is None else runner.last_tokens.index_select(0, self.idx)
        self.spec = None if speculative is None else speculative.checkpoint(slots)

    def roll_back(self, pending: PendingTokens) -> None:
        """Undo everything the call did to its contexts' slots, given its pending tokens (the
        tokens committed to the sampler in this call)."""
        if not self.contexts:
            return
        host = pending.to_host([c.request_id for c in self.contexts])
        n = max(len(host[c.request_id][0]) for c in self.contexts)
        tokens = torch.full((len(self.contexts), n), -1, dtype=torch.long)
        for r, c in enumerate(self.contexts):
            toks = host[c.request_id][0]
            tokens[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        self.sampler.restore(self.checkpoint, tokens)
        self.runner.set_last_tokens(self.idx, self.last)
        for c, length in zip(self.contexts, self.lengths, strict=True):
            c.length = length
        if self.speculative is not None:
            self.speculative.restore(self.spec, {c.slot: c.length for c in self.contexts})
