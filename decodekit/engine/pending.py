"""Tokens sampled during one ``next_token`` call, kept on the device until one transfer.

A plain or prefill step leaves its tokens in a :class:`~decodekit.outputs.SamplerOutput`
on the device; the call records ``(output, row)`` per request and moves everything to the
host at once at the end (:meth:`PendingTokens.to_host`). A speculative step needs its
tokens on the host anyway (to advance the lengths), so it adds host tokens directly.
Calls nothing but the sampler outputs it holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from ..outputs import LogProbabilities, SamplerOutput

__all__ = ["PendingTokens"]


class _Entry(NamedTuple):
    """One pending token: on the device (``output`` + ``row``) or on the host (``token``)."""

    output: SamplerOutput | None = None
    row: int = 0
    token: int = -1
    logprobs: LogProbabilities | None = None


class PendingTokens:
    """Per request id, the tokens of this call in order. ``logprobs[rid]`` is the number of
    top logprobs the request asked for (None: none)."""

    def __init__(self, logprobs: dict[str, int | None]) -> None:
        self._logprobs = logprobs
        self._items: dict[str, list[_Entry]] = {rid: [] for rid in logprobs}

    def count(self, rid: str) -> int:
        return len(self._items[rid])

    def add_sampled(self, rids: Sequence[str], output: SamplerOutput) -> None:
        """Row ``i`` of ``output`` is request ``rids[i]``'s next token (still on the device)."""
        for i, rid in enumerate(rids):
            self._items[rid].append(_Entry(output=output, row=i))

    def add_host(self, rid: str, tokens: Iterable[int], logprobs: Iterable[LogProbabilities | None]) -> None:
        for t, lp in zip(tokens, logprobs, strict=True):
            self._items[rid].append(_Entry(token=t, logprobs=lp))

    def to_host(self, rids: Iterable[str] | None = None
                ) -> dict[str, tuple[list[int], list[LogProbabilities | None]]]:
        """Tokens and logprobs of ``rids`` (default: all) on the host: one device-to-host
        transfer for every device entry. Device entries become host entries."""
        rids = list(self._items) if rids is None else list(rids)
        outputs: dict[int, SamplerOutput] = {}
        for rid in rids:
            for e in self._items[rid]:
                if e.output is not None:
                    outputs.setdefault(id(e.output), e.output)
        order = list(outputs)
        flat = torch.cat([outputs[k].token_ids for k in order]).tolist() if order else []
        base, at = {}, 0
        for k in order:
            base[k] = at
            at += outputs[k].token_ids.shape[0]
        host = {}
        for rid in rids:
            n_lp = self._logprobs[rid]
            entries = [e if e.output is None else
                       _Entry(token=flat[base[id(e.output)] + e.row],
                              logprobs=None if n_lp is None else e.output.log_probabilities(e.row, n_lp))
                       for e in self._items[rid]]
            self._items[rid] = entries
            host[rid] = ([e.token for e in entries], [e.logprobs for e in entries])
        return host
