"""One host-to-device upload per step: a ring of preallocated (pinned on CUDA) int64 buffers.

A decode step needs a few small integer vectors on the device (slot indices, positions,
lengths). Uploading each as its own tensor costs a pinned allocation, a copy launch and
a Python round trip per vector. :class:`StepUploads` packs them into one preallocated host
buffer and issues a single non-blocking copy into a preallocated device buffer, returning
views.

Several steps of one call run without a host synchronisation, so a host buffer may still
be in flight when the next step wants it: the buffers form a ring and each one records a
CUDA event after its copy; reusing a buffer first waits on its event (in steady state the
copy finished long ago and the wait returns at once). The device views of an upload stay
valid until the ring comes round to the same buffer (``depth`` uploads later); callers use
them within their step.

Calls nothing outside torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["StepUploads"]


class StepUploads:
    """Ring of ``depth`` host/device int64 buffer pairs of ``capacity`` elements each.

    Parameters
    ----------
    capacity : int
        Most int64 values one upload carries (larger uploads fall back to a one-off copy).
    device : torch.device
    depth : int
        Buffers in the ring (uploads in flight before one waits).
    """

    def __init__(self, capacity: int, device: torch.device, depth: int = 4) -> None:
        self.capacity, self.device = capacity, device
        cuda = device.type == "cuda"
        self._host = [torch.empty(capacity, dtype=torch.int64, pin_memory=cuda) for _ in range(depth)]
        self._np = [h.numpy() for h in self._host]
        self._dev = [torch.empty(capacity, dtype=torch.int64, device=device) if cuda else None
                     for _ in range(depth)]
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0
        self.uploads = 0  # host-to-device copies issued (the tests count them)

    def put(self, *parts: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, ...]:
        """Upload ``parts`` (host int sequences; an int32 numpy array stays int32, two per
        int64 element, anything else is int64) in one copy; returns one device view per part,
        in order (on a CPU device: fresh tensors, never aliased across calls)."""
        arrs = [p if isinstance(p, np.ndarray) and p.dtype == np.int32 else np.asarray(p, dtype=np.int64)
                for p in parts]
        words = [(a.shape[0] + 1) // 2 if a.dtype == np.int32 else a.shape[0] for a in arrs]
        total = sum(words)
        self.uploads += 1
        if self.device.type != "cuda" or total > self.capacity:
            return tuple(torch.from_numpy(a.copy()).to(self.device, non_blocking=True) for a in arrs)
        i = self._next
        self._next = (i + 1) % len(self._host)
        if self._events[i] is not None:
            self._events[i].synchronize()  # that buffer's previous copy has left the host
        buf, dev, at = self._np[i], self._dev[i], 0
        views = []
        for a, w in zip(arrs, words, strict=True):
            if a.dtype == np.int32:
                buf[at: at + w].view(np.int32)[: a.shape[0]] = a
                views.append(dev[at: at + w].view(torch.int32)[: a.shape[0]])
            else:
                buf[at: at + w] = a
                views.append(dev[at: at + w])
            at += w
        dev[:total].copy_(self._host[i][:total], non_blocking=True)
        if self._events[i] is None:
            self._events[i] = torch.cuda.Event()
        self._events[i].record()
        return tuple(views)
