"""The simplest scheduler over the per-step API: first come, first served.

:func:`continuous_batching` admits requests in order as slots free up, advances every
running request each call, releases finished ones at once, and releases whatever still
runs when the loop ends early (an error, or a consumer that stops iterating). ``LLM``,
the CLI and the benchmarks all drive the generator through it.

May call: :class:`~decodekit.TokenGenerator` (its public API only).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from ..outputs import TextGenerationResponse
from .context import TextGenerationContext

__all__ = ["continuous_batching"]


def continuous_batching(gen: Any, contexts: Iterable[TextGenerationContext], num_steps: int = 1
                        ) -> Iterator[dict[str, TextGenerationResponse]]:
    """Run ``contexts`` to completion on ``gen`` (a :class:`~decodekit.TokenGenerator`).

    Yields each :meth:`~decodekit.TokenGenerator.next_token` result (request id ->
    response) as it comes. Contexts that were never admitted when the loop stops early stay
    as they were (ACTIVE, no slot).
    """
    waiting = deque(contexts)
    running: dict[str, TextGenerationContext] = {}
    try:
        while waiting or running:
            free = len(gen.free_slots) - sum(c.slot is None for c in running.values())  # preempted ones
            if not running and free == 0:
                raise RuntimeError("no free slot: every slot of the generator is held by other requests")
            while waiting and free > 0:
                ctx = waiting.popleft()
                running[ctx.request_id] = ctx
                free -= 1
            res = gen.next_token(running, num_steps)
            for rid, r in res.items():
                if r.is_done:
                    gen.release(running.pop(rid))
            yield res
    finally:
        for ctx in running.values():
            gen.release(ctx)
