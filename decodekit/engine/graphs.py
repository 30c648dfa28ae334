"""CUDA graphs of the decode forward, one per batch-size bucket (1, 2, 4, ... up to the slots).

Static inputs: the runner's newest-token buffer, and position / length buffers filled
each step; attention spans every position of the cache (the masks are built inside the
graph from the buffers). A bucket whose capture fails falls back to eager.

The capture itself is a parameter (:func:`cuda_capture` on a GPU), so the bucket and
padding logic also runs on a CPU with a capture that replays eagerly (the tests do).

Calls only the forward function it is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["DecodeGraphs", "cuda_capture", "eager_capture"]

Replay = Callable[[], None]
Capture = Callable[[Callable[[], torch.Tensor], torch.device], tuple[Replay, torch.Tensor]]


def cuda_capture(fn: Callable[[], torch.Tensor], device: torch.device, pool=None
                 ) -> tuple[Replay, torch.Tensor]:
    """Capture ``fn`` as a CUDA graph (after two warm-up calls on a side stream)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up allocations and lazy initialisation
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


def eager_capture(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Replay, torch.Tensor]:
    """A stand-in for :func:`cuda_capture` that replays ``fn`` eagerly into a static output."""
    out = fn().clone()
    return (lambda: out.copy_(fn())), out


class DecodeGraphs:
    """Per-bucket captured decode forwards over slots ``0 .. b-1``.

    Parameters
    ----------
    forward : callable
        ``forward(pos [b, 1], length [b]) -> logits [b, 1, V]`` over slots ``0..b-1``
        (reading the newest tokens from a static buffer).
    max_slots : int
        Largest bucket.
    device : torch.device
    capture : callable, optional
        Default: :func:`cuda_capture` sharing one memory pool across buckets.
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_slots: int,
                 device: torch.device, capture: Capture | None = None) -> None:
        self.forward, self.device = forward, device
        self.buckets = sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self.pos = torch.zeros(max_slots, 1, dtype=torch.long, device=device)
        self.length = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[Replay, torch.Tensor]] = {}
        self.failed: set[int] = set()
        self._pool = None
        self._capture = capture or self._cuda_capture

    def _cuda_capture(self, fn, device):
        if self._pool is None:  # one memory pool shared by every bucket
            self._pool = torch.cuda.graph_pool_handle()
        return cuda_capture(fn, device, self._pool)

    def bucket(self, n: int) -> int:
        """Smallest bucket holding ``n`` rows."""
        return next(b for b in self.buckets if b >= n)

    def ready(self, n: int) -> bool:
        return self.bucket(n) in self.graphs

    def capture_all(self) -> None:
        """Capture every bucket now, while the cache holds no request (warm-up forwards
        write at position 0 of slots ``0..b-1``)."""
        for b in self.buckets:
            self.pos[:b].zero_()
            self.length[:b].zero_()
            try:
                self.graphs[b] = self._capture(lambda b=b: self.forward(self.pos[:b], self.length[:b]),
                                               self.device)
            except Exception as e:  # noqa: BLE001 - any capture failure means eager
                warnings.warn(f"decodekit: CUDA graph capture failed for batch {b}, running "
                              f"eagerly ({type(e).__name__}: {e})", stacklevel=3)
                self.failed.add(b)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)

    def run(self, b: int, pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Replay bucket ``b`` with ``pos [b]`` / ``length [b]`` (device tensors covering every
        row of the bucket: rows that do not decode write at their own free position).
        Returns the static logits ``[b, 1, V]`` (valid until the next replay)."""
        self.pos[:b, 0].copy_(pos, non_blocking=True)
        self.length[:b].copy_(length, non_blocking=True)
        replay, logits = self.graphs[b]
        replay()
        return logits
