"""The model runner: batch inputs, the forward over the slot KV cache, uploads, CUDA graphs.

A :class:`ModelRunner` owns one model's slot cache, its steering hooks and a device
buffer of each slot's newest sampled token (the next decode input, so decode steps never
copy tokens from the host). It knows slots and positions, not requests: the caller passes
each slot's cache length (``lengths[slot]``, 0 for a free slot).

Batches cover a contiguous slot range ``0 .. n-1`` (or one run of contiguous slots for a
prefill), so the cache hands attention views, never copies. Rows in the range that are not
being run still go through the forward: they write at their own next free position, which
is masked and overwritten later.

May call: :mod:`.model_adapter`, :mod:`.kv_cache`, :mod:`.graphs`, the steering hooks.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch

from ..nvtx import nvtx_range
from ..steering.hooks import SteeringHooks, maybe_bound
from .graphs import Capture, DecodeGraphs
from .kv_cache import SlotKVCache
from .model_adapter import ModelAdapter

__all__ = ["KV_CHUNK", "ModelRunner"]

KV_CHUNK = 64  # eager forwards attend over the longest row rounded up to this


class ModelRunner:
    """Runs one causal LM over the slots of its own :class:`SlotKVCache`.

    Parameters
    ----------
    adapter : ModelAdapter
        The model.
    max_slots, max_seq_len : int
        Slots and positions per slot.
    scratch : int
        Extra positions per slot past ``max_seq_len`` (a speculative window writes there).
    steering : bool
        Install :class:`~decodekit.steering.SteeringHooks` on the decoder layers (skipped
        quietly when the layers cannot be found: ``hooks`` is then None).
    """

    def __init__(self, adapter: ModelAdapter, max_slots: int, max_seq_len: int, *, scratch: int = 0,
                 steering: bool = True) -> None:
        self.adapter, self.model = adapter, adapter.model
        self.device, self.dtype = adapter.device, adapter.dtype
        self.max_slots, self.max_seq_len = max_slots, max_seq_len
        self.cache = SlotKVCache(self.model.config, max_slots, max_seq_len + scratch, self.device, self.dtype)
        self.last_tokens = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # [slots]
        self.hooks: SteeringHooks | None = None
        if steering:
            try:
                self.hooks = SteeringHooks(self.model, max_slots, self.device)
            except ValueError:  # no decoder layer list: steering requests will say so
                self.hooks = None
            else:  # the hooks live as long as the runner
                weakref.finalize(self, self.hooks.remove)
        self.graphs: DecodeGraphs | None = None
        self.steered_graphs: DecodeGraphs | None = None  # captured with steering on every layer

    # ------------------------------------------------------------------ basics
    @property
    def steered(self) -> bool:
        """Whether any slot is steered now (decode then replays :attr:`steered_graphs`)."""
        return self.hooks is not None and self.hooks.active

    def upload(self, values: Sequence[int]) -> torch.Tensor:
        """int64 host list -> device tensor (pinned, non-blocking on CUDA)."""
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def kv_len(self, longest: int) -> int:
        """Positions an eager forward attends over: ``longest`` rounded up to :data:`KV_CHUNK`."""
        return min(self.cache.max_seq_len, -(-longest // KV_CHUNK) * KV_CHUNK)

    def forward(self, input_ids: torch.Tensor, q_pos: torch.Tensor, length: torch.Tensor,
                first_slot: int, kv_len: int, keep: int = 1) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` positions of ``input_ids [B, q]`` for
        slots ``first_slot .. first_slot + B``, written at ``q_pos [B, q]``, each row seeing
        its first ``length [B]`` positions (of ``kv_len``)."""
        self.cache.bind(first_slot, q_pos, kv_len)
        with maybe_bound(self.hooks, first_slot, q_pos):
            return self.adapter.forward(input_ids, q_pos, length, self.cache, kv_len, keep)

    def set_last_tokens(self, slots: torch.Tensor | slice, tokens: torch.Tensor) -> None:
        """The next decode inputs: ``tokens [R]`` (device) for ``slots`` (an int64 index ``[R]``
        on the device, or a slice of contiguous slots)."""
        if isinstance(slots, slice):
            self.last_tokens[slots] = tokens
        else:
            self.last_tokens.index_copy_(0, slots, tokens)

    # ------------------------------------------------------------------ batches
    def prefill(self, prompts: Sequence[Sequence[int]], first_slot: int) -> torch.Tensor:
        """Prefill prompts into the contiguous slots ``first_slot ..``, left-padded so that every
        row's last prompt token is the last column (pads write at free positions after their
        row's prompt). Returns the logits ``[R, V]`` of each prompt's last token."""
        P = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        pos = torch.zeros(len(prompts), P, dtype=torch.long)
        for r, p in enumerate(prompts):
            n = len(p)
            ids[r, P - n:] = torch.tensor(list(p), dtype=torch.long)
            pos[r, P - n:] = torch.arange(n)
            pos[r, : P - n] = torch.arange(n, P)
        lengths = self.upload([len(p) for p in prompts])
        with nvtx_range("decodekit.forward", int(ids.numel())):
            logits = self.forward(ids.to(self.device), pos.to(self.device), lengths, first_slot,
                                  self.kv_len(P))
        return logits[:, -1]

    def decode(self, slots: Sequence[int], lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode forward for ``slots``: each one's newest token at position ``lengths[slot]``.

        Runs slots ``0 .. max(slots)`` (a CUDA graph of the bucket when one is ready: the steered
        set when a slot is steered). Returns ``(logits [R, V] of the rows in order, slot index
        int64 [R] on the device)``.
        """
        n = max(slots) + 1
        g = self.steered_graphs if self.steered else self.graphs
        graphs = g is not None and g.ready(n)
        n_fill = g.bucket(n) if graphs else n  # a graph runs its whole bucket
        pos, length = self._idle_rows(lengths, n_fill)
        for s in slots:
            pos[s], length[s] = lengths[s], lengths[s] + 1
        idx = self.upload(list(slots))
        with nvtx_range("decodekit.forward", n_fill):
            if graphs:
                logits = g.run(n_fill, self.upload(pos), self.upload(length))
            else:
                longest = max(length[s] for s in slots)
                logits = self.forward(self.last_tokens[:n, None], self.upload(pos)[:, None],
                                      self.upload(length), 0, self.kv_len(longest))
        return logits[:, -1].index_select(0, idx), idx

    def window(self, slots: Sequence[int], drafts: torch.Tensor, lengths: Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The verification forward of a speculative step: per row, its newest token then its
        drafts ``drafts [R, K]`` (device, -1 = none; fed as token 0 and never accepted), at
        positions ``lengths[slot] ..``. Returns ``(logits [R, K + 1, V], slot index [R])``."""
        K = drafts.shape[1]
        q = K + 1
        n = max(slots) + 1
        ar = torch.arange(q)
        pos = torch.zeros(n, q, dtype=torch.long)
        length = torch.zeros(n, dtype=torch.long)
        for s in range(n):  # other rows write after their own length (free space)
            if lengths[s]:
                pos[s] = lengths[s] + ar
                length[s] = lengths[s] + 1
        for s in slots:
            pos[s] = lengths[s] + ar
            length[s] = lengths[s] + q
        idx = self.upload(list(slots))
        ids = self.last_tokens[:n, None].repeat(1, q)
        ids[idx[:, None], torch.arange(1, q, device=self.device)[None, :]] = drafts.clamp(min=0)
        longest = max(lengths[s] for s in slots) + q
        with nvtx_range("decodekit.forward", n * q):
            logits = self.forward(ids, pos.to(self.device), length.to(self.device), 0, self.kv_len(longest),
                                  keep=q)
        return logits.index_select(0, idx), idx

    def _idle_rows(self, lengths: Sequence[int], n: int) -> tuple[list[int], list[int]]:
        """Positions and lengths for rows ``0..n-1`` that do not run: an owned slot writes at
        its next free position, a free slot at position 0 (length 0)."""
        pos, length = [0] * n, [0] * n
        for s in range(n):
            if lengths[s]:
                p = min(lengths[s], self.max_seq_len - 1)
                pos[s], length[s] = p, p + 1
        return pos, length

    # ------------------------------------------------------------------ CUDA graphs
    def enable_graphs(self, capture: Capture | None = None) -> None:
        """Capture the decode forward per batch-size bucket now (call while no slot is in use).
        ``capture`` defaults to CUDA graph capture; pass
        :func:`~decodekit.engine.graphs.eager_capture` to run the same logic on a CPU."""

        def forward(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            b = pos.shape[0]
            return self.forward(self.last_tokens[:b, None], pos, length, 0, self.max_seq_len)

        def steered(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            with self.hooks.every_layer():  # the tables are read inside the graph
                return forward(pos, length)

        self.graphs = DecodeGraphs(forward, self.max_slots, self.device, capture)
        if self.hooks is not None:
            self.steered_graphs = DecodeGraphs(steered, self.max_slots, self.device, capture)
        with torch.inference_mode():
            for g in (self.graphs, self.steered_graphs):
                if g is not None:
                    g.capture_all()
