"""The per-step token bitmask of a batch with guided rows.

:class:`BitmaskBuffer` holds a host buffer ``int32 [max_rows, ceil(V / 32)]`` (pinned on CUDA)
and its device twin. :meth:`BitmaskBuffer.fill` writes each guided row from its matcher and
all-ones for the others, then uploads the batch's rows without blocking, so on a GPU the
host work overlaps the forward the caller has already enqueued.

May call: :mod:`.grammar` (a :class:`~.grammar.Guide` fills its row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grammar import Guide, bitmask_words

__all__ = ["BitmaskBuffer"]


class BitmaskBuffer:
    """Bitmask rows for up to ``max_rows`` rows of a ``vocab_size`` vocabulary on ``device``."""

    def __init__(self, vocab_size: int, max_rows: int, device: torch.device) -> None:
        self.words = bitmask_words(vocab_size)
        pin = device.type == "cuda"
        with torch.inference_mode(False):  # made during a step, filled in place at any time
            self._host = torch.full((max_rows, self.words), -1, dtype=torch.int32, pin_memory=pin)
            self._dev = self._host if device.type == "cpu" else torch.empty_like(self._host, device=device)
        self._device = device

    @property
    def rows(self) -> int:
        """Rows the buffer holds."""
        return self._host.shape[0]

    def fill(self, guides: Sequence[Guide | None]) -> torch.Tensor:
        """The allowed tokens of each row, int32 ``[len(guides), W]`` on the device (all-ones
        for rows without a guide)."""
        host = self.host_rows(len(guides))
        for i, g in enumerate(guides):
            if g is not None:
                g.fill_or_end(host, i)
        return self.upload(len(guides))

    def host_rows(self, n: int) -> torch.Tensor:
        """The first ``n`` host rows, reset to all-allowed, for the caller to fill."""
        if n > self._host.shape[0]:
            raise ValueError(f"{n} rows but the bitmask buffer holds {self._host.shape[0]}")
        host = self._host[:n]
        host.fill_(-1)
        return host

    def upload(self, n: int) -> torch.Tensor:
        """The first ``n`` rows on the device (a non-blocking copy from pinned memory on CUDA:
        the caller reads the step's sampled tokens, a synchronisation, before the next fill)."""
        if self._dev is self._host:
            return self._host[:n]
        dev = self._dev[:n]
        dev.copy_(self._host[:n], non_blocking=True)
        return dev
