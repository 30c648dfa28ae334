"""The simplest scheduler over the per-step API: first come, first served.

:class:`Scheduler` is the one scheduling loop of the project: it admits requests in order
as slots free up, advances every running request each :meth:`~Scheduler.step`, releases
finished ones at once, and cancels requests on demand (waiting or running). With
``isolate_failures`` a step that raises is retried on halves of the batch until the
request that fails alone is found: that request fails (released, its error reported) and
the others go on. :func:`continuous_batching` drives it over a fixed set of contexts
(``LLM``, the CLI and the benchmarks); the server's engine thread drives it over requests
that arrive while it runs (:mod:`decodekit.serving.engine`).

Not thread-safe: one owner calls it. May call: :class:`~decodekit.TokenGenerator` (its
public API only).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..outputs import TextGenerationResponse
from .context import TextGenerationContext

__all__ = ["Scheduler", "StepResult", "continuous_batching"]


@dataclass
class StepResult:
    """One :meth:`Scheduler.step`: the generator's responses (request id -> response) and the
    requests that failed alone (request id -> the exception), already released."""

    responses: dict[str, TextGenerationResponse] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)


class Scheduler:
    """First-come-first-served continuous batching of contexts on ``gen``.

    Parameters
    ----------
    gen : TokenGenerator
        The generator (used through its public API only).
    num_steps : int
        Steps per :meth:`~decodekit.TokenGenerator.next_token` call.
    isolate_failures : bool
        False: an exception of a step propagates (the generator has undone the call, the
        requests are as they were). True: the step is retried on halves of the batch, and a
        request whose step fails on its own is released and reported in
        :attr:`StepResult.failed`; exceptions that are not ``Exception`` (``KeyboardInterrupt``)
        always propagate.
    """

    def __init__(self, gen: Any, num_steps: int = 1, *, isolate_failures: bool = False) -> None:
        self.gen = gen
        self.num_steps = num_steps
        self.isolate_failures = isolate_failures
        self.waiting: deque[TextGenerationContext] = deque()
        self.running: dict[str, TextGenerationContext] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, contexts: Iterable[TextGenerationContext]) -> None:
        """Queue ``contexts`` behind the waiting ones."""
        self.waiting.extend(contexts)

    def cancel(self, request_id: str) -> bool:
        """Cancel a waiting or running request (it ends CANCELLED and holds nothing); False
        when the scheduler does not hold it (finished, failed or unknown)."""
        ctx = self.running.pop(request_id, None)
        if ctx is None:
            ctx = next((c for c in self.waiting if c.request_id == request_id), None)
            if ctx is None:
                return False
            self.waiting.remove(ctx)
        self.gen.release(ctx)
        return True

    def step(self) -> StepResult:
        """Admit what fits, advance the running requests one call, release finished ones."""
        free = len(self.gen.free_slots) - sum(c.slot is None for c in self.running.values())  # preempted
        if not self.running and free <= 0 and self.waiting:
            raise RuntimeError("no free slot: every slot of the generator is held by other requests")
        while self.waiting and free > 0:
            ctx = self.waiting.popleft()
            self.running[ctx.request_id] = ctx
            free -= 1
        result = StepResult()
        if self.running:
            self._advance(dict(self.running), result)
        for rid, r in result.responses.items():
            if r.is_done:
                self.gen.release(self.running.pop(rid))
        return result

    def close(self, cancel_waiting: bool = False) -> None:
        """Release the running requests (they end CANCELLED); the waiting ones too with
        ``cancel_waiting``, else they stay as they were (ACTIVE, no slot)."""
        for ctx in self.running.values():
            self.gen.release(ctx)
        self.running.clear()
        if cancel_waiting:
            for ctx in self.waiting:
                self.gen.release(ctx)
            self.waiting.clear()

    def _advance(self, batch: dict[str, TextGenerationContext], result: StepResult) -> None:
        """One call on ``batch``; on failure (with ``isolate_failures``) the halves in turn."""
        try:
            result.responses.update(self.gen.next_token(batch, self.num_steps))
            return
        except Exception as exc:
            if not self.isolate_failures:
                raise
            if len(batch) == 1:
                (rid, ctx), = batch.items()
                self.running.pop(rid, None)
                self.gen.release(ctx)
                result.failed[rid] = exc
                return
        ids = list(batch)
        half = len(ids) // 2
        for part in (ids[:half], ids[half:]):
            self._advance({rid: batch[rid] for rid in part}, result)


def continuous_batching(gen: Any, contexts: Iterable[TextGenerationContext], num_steps: int = 1
                        ) -> Iterator[dict[str, TextGenerationResponse]]:
    """Run ``contexts`` to completion on ``gen`` (a :class:`~decodekit.TokenGenerator`).

    Yields each :meth:`~decodekit.TokenGenerator.next_token` result (request id ->
    response) as it comes; an exception of a step propagates. Contexts that were never
    admitted when the loop stops early stay as they were (ACTIVE, no slot); running ones
    are released.
    """
    scheduler = Scheduler(gen, num_steps)
    scheduler.add(contexts)
    try:
        while scheduler.has_work:
            yield scheduler.step().responses
    finally:
        scheduler.close()
