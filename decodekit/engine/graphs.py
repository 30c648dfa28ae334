"""CUDA graphs of the decode forward, one per batch-size bucket (1, 2, 4, ... up to the slots),
and of verification windows (``width`` query positions per row), one set per width.

Static inputs: token buffers of the runner (its newest tokens, or a window's tokens), and
position / length buffers filled each step; attention spans every position of the cache
(the masks are built inside the graph from the buffers). A bucket whose capture fails
falls back to eager and says so.

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
        ``forward(pos [b, width], length [b]) -> logits [b, width, V]`` over slots ``0..b-1``
        (reading the tokens from a static buffer).
    max_slots : int
        Largest bucket.
    device : torch.device
    capture : callable, optional
        Default: :func:`cuda_capture`.
    width : int
        Query positions per row (1: decode; ``k + 1``: a verification window).
    pool : optional
        CUDA graph memory pool to share (default: one of its own, shared by its buckets).
    name : str
        What the warnings call this set (e.g. ``"decode"``, ``"window 5"``).
    """

    def __init__(self, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_slots: int,
                 device: torch.device, capture: Capture | None = None, *, width: int = 1,
                 pool=None, name: str = "decode") -> None:
        self.forward, self.device, self.width, self.name = forward, device, width, name
        self.buckets = sorted({min(1 << i, max_slots) for i in range(max_slots.bit_length() + 1)})
        self.pos = torch.zeros(max_slots, width, dtype=torch.long, device=device)
        self.length = torch.zeros(max_slots, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[Replay, torch.Tensor]] = {}
        self.failed: set[int] = set()
        self._pool = pool
        self._capture = capture or self._cuda_capture

    def _cuda_capture(self, fn, device):
        if self._pool is None:  # one memory pool shared by every bucket
            self._pool = torch.cuda.graph_pool_handle()
        return cuda_capture(fn, device, self._pool)

    @property
    def pool(self):
        """The CUDA graph memory pool (None until the first CUDA capture)."""
        return self._pool

    def bucket(self, n: int) -> int:
        """Smallest bucket holding ``n`` rows."""
        return next(b for b in self.buckets if b >= n)

    def ready(self, n: int) -> bool:
        return self.bucket(n) in self.graphs

    def capture_all(self) -> None:
        """Capture every bucket now, while the cache holds no request (warm-up forwards
        write at positions ``0..width-1`` of slots ``0..b-1``)."""
        for b in self.buckets:
            self.pos[:b] = torch.arange(self.width, device=self.device)
            self.length[:b].zero_()
            try:
                self.graphs[b] = self._capture(lambda b=b: self.forward(self.pos[:b], self.length[:b]),
                                               self.device)
            except Exception as e:  # noqa: BLE001 - any capture failure means eager
                warnings.warn(f"decodekit: CUDA graph capture failed for {self.name} batch {b}, running "
                              f"eagerly ({type(e).__name__}: {e})", stacklevel=3)
                self.failed.add(b)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)

    def run(self, b: int, pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Replay bucket ``b`` with ``pos [b, width]`` (or ``[b]`` for width 1) / ``length [b]``
        (device tensors covering every row of the bucket: rows that do not run write at their
        own free positions). Returns the static logits ``[b, width, V]`` (valid until the next
        replay of this bucket)."""
        self.pos[:b].copy_(pos.view(b, self.width), non_blocking=True)
        self.length[:b].copy_(length, non_blocking=True)
        replay, logits = self.graphs[b]
        replay()
        return logits

    def run_padded(self, pos: torch.Tensor, length: torch.Tensor, pad_pos: int) -> torch.Tensor:
        """Width-1 replay for rows ``0..n-1`` at ``pos [n]`` / ``length [n]`` (device); the
        bucket's rows past ``n`` write at ``pad_pos`` of their own slot (a position no
        request ever holds). Returns the logits ``[n, V]`` (valid until the next replay)."""
        n = pos.shape[0]
        b = self.bucket(n)
        self.pos[:n, 0].copy_(pos, non_blocking=True)
        self.length[:n].copy_(length, non_blocking=True)
        if b > n:
            self.pos[n:b].fill_(pad_pos)
            self.length[n:b].fill_(pad_pos + 1)
        replay, logits = self.graphs[b]
        replay()
        return logits[:n, -1]
