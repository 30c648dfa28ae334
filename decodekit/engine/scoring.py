"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``), computed during the prefill.

A prompt whose log-probabilities are wanted is prefilled in chunks through its KV cache, each
forward returning the logits of its chunk only, so no ``[P, V]`` tensor exists for a long
prompt: at most :data:`CHUNK_ELEMENTS` logits at a time. Its prefix is not taken from the
prefix cache (those positions would have no logits): it is recomputed, and its full blocks
are offered to the prefix cache afterwards as usual.

May call: the runner (:meth:`~decodekit.engine.runner.ModelRunner.prefill_span`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..outputs import LogProbabilities

__all__ = ["CHUNK_ELEMENTS", "score_prompt"]

#: Logits held at once while scoring a prompt (positions per chunk: this // vocabulary size).
CHUNK_ELEMENTS = 1 << 23


def score_prompt(runner: Any, slot: int, tokens: Sequence[int], k: int, vocab_size: int
                 ) -> list[LogProbabilities | None]:
    """Forward ``tokens[:-1]`` into ``slot``'s cache (empty: nothing cached) in chunks and
    return the raw log-probability of each token given the ones before it, with the ``k``
    most likely: entry 0 None, entry ``i`` for ``tokens[i]``. The caller prefills the last
    token (its logits give the first generated one)."""
    out: list[LogProbabilities | None] = [None]
    step = max(1, CHUNK_ELEMENTS // vocab_size)
    P = len(tokens)
    for a in range(0, P - 1, step):
        b = min(P - 1, a + step)
        lp = torch.log_softmax(runner.prefill_span(tokens, slot, a, b).float(), -1)  # [b - a, V]
        nxt = torch.tensor(list(tokens[a + 1: b + 1]), dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
        top_v = top_i = None
        if k:
            top = lp.topk(k, -1)
            top_v, top_i = top.values.tolist(), top.indices.tolist()
        for j, t in enumerate(tokens[a + 1: b + 1]):
            top_d = dict(zip(top_i[j], top_v[j], strict=True)) if k else {}
            top_d.setdefault(int(t), chosen[j])
            out.append(LogProbabilities([chosen[j]], [top_d]))
    return out
