"""The model runner: batch inputs, the forward over the KV cache, uploads, CUDA graphs.

A :class:`ModelRunner` owns one model's KV cache (paged, with its block tables in
:attr:`ModelRunner.kv`, or static slots), its steering hooks, its LoRA hooks (when built with
``lora``) and a device
buffer of each slot's newest sampled token (the next decode input, so decode steps never
copy tokens from the host). It knows slots and positions, not requests: the caller passes
each slot's cache length (``lengths[slot]``, 0 for a free slot).

Batches cover a contiguous slot range ``0 .. n-1`` (or one run of contiguous slots for a
prefill), so the cache hands attention views, never copies. Rows in the range that are not
being run still go through the forward: they write at their own next free position, which
is masked and overwritten later. A step's integers (slots, positions, lengths) travel in
one upload (:mod:`.staging`); decode steps and verification windows replay CUDA graphs
when captured (:meth:`ModelRunner.enable_graphs`).

Eager verification windows on a CPU run *packed* (:attr:`ModelRunner.packs_windows`): only
the real tokens (each row's newest and its own drafts; nothing of free rows) go through the
model, as one row of ``N`` tokens, and attention lays them out on the rows' grid
(:func:`~.attention.packed_attention`), so a window where one request drafts 16 tokens and
seven draft none costs about a forward of 24 tokens, not of 8 x 17 (SmolLM2 on 2 cores:
3.2 one-token forwards instead of 5.6).

May call: :mod:`.model_adapter`, :mod:`.kv_cache`, :mod:`.paging`, :mod:`.attention`,
:mod:`.graphs`, :mod:`.staging`, the steering hooks, :mod:`decodekit.lora` (tables, hooks).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..lora.hooks import LoRAHooks
from ..lora.tables import LoRATables
from ..nvtx import nvtx_range
from ..steering.hooks import SteeringHooks, maybe_bound
from .attention import GQA, gqa_attention, kernel_attention, packed_attention
from .graphs import Capture, DecodeGraphs
from .kv_cache import PagedKVCache, SlotKVCache
from .model_adapter import ModelAdapter
from .paging import KVBlocks
from .staging import StepUploads

__all__ = ["KV_CHUNK", "PACK_MULTIPLE", "ModelRunner", "Paging", "Rows", "round_packed", "window_widths"]

KV_CHUNK = 64  # eager forwards attend over the longest row rounded up to this


class Rows(NamedTuple):
    """A forward's output for the rows of a step, and the step's integers on the device.

    ``logits``: ``[R, V]`` (decode) or ``[R, K + 1, V]`` (window); ``index``: the slots,
    int64 ``[R]``; ``index32``: the same as int32 (what the sampler takes); ``n_draft``:
    drafts per row, int64 ``[R]`` (windows; else empty)."""

    logits: torch.Tensor
    index: torch.Tensor
    index32: torch.Tensor
    n_draft: torch.Tensor | None = None


class Paging(NamedTuple):
    """A paged KV cache's shape: ``num_blocks`` blocks (the null block included) of
    ``block_size`` positions, with or without prefix caching; ``kernel``: attention runs the
    paged kernel (:mod:`.attention`) instead of the model's own over gathered blocks."""

    num_blocks: int
    block_size: int = 16
    prefix_caching: bool = True
    kernel: bool = False


def window_widths(k: int) -> list[int]:
    """Verification-window widths captured for drafts of up to ``k`` tokens: powers of two
    from 2, and ``k + 1`` itself (a window pads up to the next width)."""
    return sorted({min(1 << i, k + 1) for i in range(1, (k + 1).bit_length() + 1)})


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
    paging : Paging | None
        Keep the KV cache in blocks (:class:`~decodekit.engine.kv_cache.PagedKVCache`, the
        block tables in :attr:`kv`); None: one static row of positions per slot. With paging
        the caller says what each slot holds and writes (:meth:`admit`, :meth:`reserve`,
        :meth:`free`); without, those are no-ops.
    """

    def __init__(self, adapter: ModelAdapter, max_slots: int, max_seq_len: int, *, scratch: int = 0,
                 steering: bool = True, paging: Paging | None = None,
                 lora: tuple[int, int] | None = None) -> None:
        self.adapter, self.model = adapter, adapter.model
        self.device, self.dtype = adapter.device, adapter.dtype
        self.max_slots, self.max_seq_len = max_slots, max_seq_len
        self.kv: KVBlocks | None = None
        if paging is None:
            self.cache = SlotKVCache(self.model.config, max_slots, max_seq_len + scratch, self.device,
                                     self.dtype, tp_size=adapter.tp_size)
        else:
            self.cache = PagedKVCache(self.model.config, max_slots, max_seq_len + scratch, self.device,
                                      self.dtype, num_blocks=paging.num_blocks, block_size=paging.block_size,
                                      tp_size=adapter.tp_size)
            # on a CPU rows are read as views of their home blocks: prefix hits are copied there
            self.kv = KVBlocks(self.cache, paging.prefix_caching,
                               home_copies=self.device.type == "cpu" and not paging.kernel)
        self.last_tokens = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # [slots]
        self.hooks: SteeringHooks | None = None
        if steering:
            try:
                self.hooks = SteeringHooks(self.model, max_slots, self.device)
            except ValueError:  # no decoder layer list: steering requests will say so
                self.hooks = None
            else:  # the hooks live as long as the runner
                weakref.finalize(self, self.hooks.remove)
        self.lora: LoRAHooks | None = None  # (max_loras, max_lora_rank): adapters per slot
        if lora is not None:
            self.lora = LoRAHooks(self.model, LoRATables(self.model, *lora), max_slots)
            weakref.finalize(self, self.lora.remove)
        self.graphs: DecodeGraphs | None = None
        self.steered_graphs: DecodeGraphs | None = None  # captured with steering on every layer
        self.window_graphs: dict[int, DecodeGraphs] = {}  # width -> verification windows
        self.steered_window_graphs: dict[int, DecodeGraphs] = {}
        self.window_ids = torch.zeros(max_slots, scratch, dtype=torch.long, device=self.device)
        # one upload per step: slots (int64 and int32), positions and lengths of every row
        self.uploads = StepUploads(max_slots * (scratch + 4) + 8, self.device)
        if paging is not None and paging.kernel:
            self.cache.kernel_attention = self._kernel_self_test()
        # on a CPU: grouped key/value heads read in place, and packed windows (where compute,
        # not weight reads, grows with the tokens), each where a check says it is exact
        self.gqa = self.packs_windows = False
        kernel = isinstance(self.cache, PagedKVCache) and self.cache.kernel_attention
        if self.device.type == "cpu" and not kernel:
            self.gqa, packs = self._attention_self_test()
            self.packs_windows = packs and adapter.tp_size == 1

    # ------------------------------------------------------------------ basics
    @property
    def steered(self) -> bool:
        """Whether any slot is steered or has a LoRA adapter now (decode then replays
        :attr:`steered_graphs`, captured with both kinds of hooks on every layer)."""
        return (self.hooks is not None and self.hooks.active) or (self.lora is not None and self.lora.active)

    @property
    def hooked(self) -> bool:
        """Whether the runner has hooks to capture a second graph set for."""
        return self.hooks is not None or self.lora is not None

    @contextlib.contextmanager
    def every_hook(self):
        """Steering on every layer and LoRA on every target layer, whatever the rows use: what
        a captured forward must hold to serve any steering or adapter later."""
        with self.hooks.every_layer() if self.hooks is not None else contextlib.nullcontext(), \
                self.lora.every_module() if self.lora is not None else contextlib.nullcontext():
            yield

    def upload(self, values: Sequence[int]) -> torch.Tensor:
        """int64 host list -> device tensor (pinned, non-blocking on CUDA)."""
        t = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _kernel_self_test(self) -> bool:
        """A prefill (several query tiles) and a decode step through the attention kernel must
        match a cache-free forward (:meth:`ModelAdapter.cache_check`); otherwise (a model whose
        attention does not go through transformers' attention interface, or no way to run
        the kernel here) warn and read the blocks through the gather path instead. Leaves
        the cache as it was."""
        n = 40

        def run(ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            return self.forward(ids, pos, length, 0, self.kv_len(int(pos[0, -1]) + 1))[:, -1]

        self.cache.kernel_attention = True
        try:
            self.kv.admit(0, list(range(1, n + 1)))  # (ids past the vocabulary only pick blocks)
            self.kv.prepare(0, n, n + 1)
            self.kv.sync()
            why = self.adapter.cache_check(run, n)
        finally:
            self.cache.kernel_attention = False
            self.kv.free(0)
            self.kv.sync()
        if why is not None:
            warnings.warn(f"paged attention kernel unusable for {self.adapter.name} ({why}); reading the KV "
                          "blocks through the torch path instead", RuntimeWarning, stacklevel=3)
        return why is None

    def _attention_self_test(self) -> tuple[bool, bool]:
        """Whether (1) the model's ``"sdpa"`` attention may run as :data:`~.attention.GQA`
        (key/value heads read in place) and (2) windows may run packed (rows of different
        widths, a free row between): each must give the logits of the model's own attention
        over a padded window (within 1e-4 relative in fp32, 1e-2 else), on a private 3-slot
        cache. A model that fails (its layers mix positions other than through its attention
        function, an attention function the backends cannot call) runs as before: slower,
        never different."""
        cache = SlotKVCache(self.model.config, 3, 64, self.device, self.dtype, tp_size=self.adapter.tp_size)
        kept = self.cache, self.kv
        widths = np.array([3, 0, 2])
        V = self.adapter.vocab_size
        ids = (torch.arange(9, device=self.device).view(3, 3) * 7 + 3) % V
        pos = torch.arange(3, device=self.device)[None].repeat(3, 1) + 5
        length = torch.tensor([8, 0, 7], device=self.device)
        tol = 1e-4 if self.dtype == torch.float32 else 1e-2

        def run(packed: bool) -> torch.Tensor:
            with torch.inference_mode():
                prompt = torch.arange(1, 16, device=self.device).view(3, 5) % V
                self.forward(prompt, torch.arange(5, device=self.device)[None].repeat(3, 1),
                             torch.full((3,), 5, device=self.device), 0, 64)
                if packed:
                    return self.forward_packed(ids, pos, length, 0, 64, widths).float()
                out = self.forward(ids, pos, length, 0, 64, keep=3)
                return torch.cat([out[0, :3], out[2, :2]]).float()

        def same(got: torch.Tensor) -> bool:
            return bool(((got - ref).abs().max() <= tol * max(ref.abs().max().item(), 1.0)).item())

        self.cache, self.kv = cache, None
        try:
            try:
                ref = run(False)
            except Exception:  # noqa: BLE001 - the model's own forward fails here: leave it to it
                return False, False
            try:
                self.gqa = self.adapter.attention_name == "sdpa"
                self.gqa = self.gqa and same(run(False))
            except Exception:  # noqa: BLE001 - any failure means: the model's own attention
                self.gqa = False
            try:
                packs = same(run(True))
            except Exception:  # noqa: BLE001 - any failure means: not packed
                packs = False
        finally:
            self.cache, self.kv = kept
        return self.gqa, packs

    def forward_packed(self, ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, first_slot: int,
                       kv_len: int, widths: np.ndarray) -> torch.Tensor:
        """A packed forward of the grid ``ids [B, q]`` at ``pos [B, q]`` (as :meth:`forward`)
        whose row ``b`` holds tokens in its first ``widths[b]`` cells only (0: a free row):
        the logits ``[N, V]`` of those ``N`` cells, row-major."""
        pack_h, unpack_h = _packing(widths, ids.shape[1])
        pack, unpack = self.uploads.put(pack_h, unpack_h)
        return self._forward_packed(ids, pos, length, first_slot, kv_len, pack, unpack)

    def _forward_packed(self, ids: torch.Tensor, pos: torch.Tensor, length: torch.Tensor, first_slot: int,
                        kv_len: int, pack: torch.Tensor, unpack: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).index_select(0, pack)[None], pos.reshape(-1).index_select(0, pack)[None]
        return self.forward(flat[0], pos, length, first_slot, kv_len, keep=pack.shape[0],
                            packed=(unpack, pack, flat[1]))[0]

    # ------------------------------------------------------------------ KV blocks
    def admit(self, slot: int, tokens: Sequence[int], salts: Sequence[bytes] = (), lookup: bool = True
              ) -> int:
        """``slot`` takes cache room for a prompt; returns its leading tokens already cached
        (prefix caching, unless not ``lookup``; 0 without paging). ``OutOfBlocks`` when the
        blocks run out."""
        return 0 if self.kv is None else self.kv.admit(slot, tokens, salts, lookup)

    def reserve(self, slots: Sequence[int], starts: Sequence[int], ends: Sequence[int], *,
                sync: bool = True) -> None:
        """Each ``slots[i]`` is about to write positions ``starts[i] .. ends[i] - 1``: hold
        private blocks for them and (``sync``) bring the device tables up to date, in one
        upload (no-op without paging). ``OutOfBlocks`` when the blocks run out."""
        if self.kv is None:
            return
        for slot, a, b in zip(slots, starts, ends, strict=True):
            self.kv.prepare(slot, a, b)
        if sync:
            self.kv.sync()

    def register(self, slot: int, tokens: Sequence[int], salts: Sequence[bytes] = ()) -> None:
        """``slot``'s cache holds ``tokens`` from position 0: offer its full blocks to the
        prefix cache (no-op without paging or prefix caching)."""
        if self.kv is not None:
            self.kv.register(slot, tokens, salts)

    def fork(self, parent: int, child: int) -> None:
        """``child`` (free) gets ``parent``'s cache contents and newest token: shared blocks,
        copied on the first write (paged), or a copy of the row (slots)."""
        if self.kv is not None:
            self.kv.fork(parent, child)
            self.kv.sync()
        else:
            for layer in self.cache.layers:
                layer.keys[child].copy_(layer.keys[parent])
                layer.values[child].copy_(layer.values[parent])
        self.last_tokens[child] = self.last_tokens[parent]

    def free(self, slot: int) -> None:
        """``slot`` lets go of its cache room (no-op without paging)."""
        if self.kv is not None:
            self.kv.free(slot)

    def kv_len(self, longest: int) -> int:
        """Positions an eager forward attends over: ``longest`` rounded up to :data:`KV_CHUNK`."""
        return min(self.cache.max_seq_len, -(-longest // KV_CHUNK) * KV_CHUNK)

    def forward(self, input_ids: torch.Tensor, q_pos: torch.Tensor, length: torch.Tensor,
                first_slot: int, kv_len: int, keep: int = 1,
                packed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits ``[B, keep, V]`` of the last ``keep`` positions of ``input_ids [B, q]`` for
        slots ``first_slot .. first_slot + B``, written at ``q_pos [B, q]``, each row seeing
        its first ``length [B]`` positions (of ``kv_len``). ``packed = (unpack [B * q], pack
        [N], positions [1, N])``: ``input_ids [1, N]`` are the grid's cells ``pack`` (see
        :func:`~.attention.packed_attention`); logits ``[1, keep, V]``."""
        kernel = self.kv is not None and self.cache.kernel_attention
        # on a CPU, rows whose blocks sit in their home ranges are read as views (no gather);
        # on CUDA the attention kernel reads the blocks (and graphs must not depend on it)
        home = self.kv is not None and not kernel and self.device.type == "cpu" and \
            self.kv.home_rows(first_slot, q_pos.shape[0])
        self.cache.bind(first_slot, q_pos, kv_len, length, home=home,
                        packed=None if packed is None else packed[0])
        if packed is not None:  # (hooks add per-row values: a packed forward runs without them)
            inner = GQA if self.gqa else None
            try:
                with packed_attention(self.adapter, packed[0], packed[1], tuple(q_pos.shape), inner):
                    return self.adapter.forward(input_ids, q_pos, length, self.cache, kv_len, keep, packed[2])
            finally:
                self.cache.end_packed()
        lora = self.lora.maybe_bound(first_slot, q_pos) if self.lora is not None else contextlib.nullcontext()
        attention = kernel_attention(self.adapter, self.cache) if kernel else \
            gqa_attention(self.adapter) if self.gqa else contextlib.nullcontext()
        with maybe_bound(self.hooks, first_slot, q_pos), lora, attention:
            return self.adapter.forward(input_ids, q_pos, length, self.cache, kv_len, keep)

    def set_last_tokens(self, slots: torch.Tensor | slice, tokens: torch.Tensor) -> None:
        """The next decode inputs: ``tokens [R]`` (device) for ``slots`` (an int64 index ``[R]``
        on the device, or a slice of contiguous slots)."""
        if isinstance(slots, slice):
            self.last_tokens[slots] = tokens
        else:
            self.last_tokens.index_copy_(0, slots, tokens)

    # ------------------------------------------------------------------ batches
    def prefill(self, prompts: Sequence[Sequence[int]], first_slot: int, starts: Sequence[int] = ()
                ) -> torch.Tensor:
        """Prefill prompts into the contiguous slots ``first_slot ..``: row ``r`` computes
        ``prompts[r][starts[r]:]`` (default: all; the positions before ``starts[r]`` are
        cached already), left-padded so that every row's last prompt token is the last column
        (pads write at free positions after their row's prompt). Returns the logits
        ``[R, V]`` of each prompt's last token."""
        if self.kv is not None:
            self.kv.sync()  # the blocks admit() handed out
        starts = list(starts) or [0] * len(prompts)
        P = max(len(p) - a for p, a in zip(prompts, starts, strict=True))
        last = self.cache.max_seq_len - 1  # never a valid position: where overflowing pads go
        ids = torch.zeros(len(prompts), P, dtype=torch.long)
        pos = torch.zeros(len(prompts), P, dtype=torch.long)
        for r, (p, a) in enumerate(zip(prompts, starts, strict=True)):
            n, m = len(p), len(p) - a
            ids[r, P - m:] = torch.tensor(list(p[a:]), dtype=torch.long)
            pos[r, P - m:] = torch.arange(a, n)
            pos[r, : P - m] = torch.arange(n, n + P - m).clamp(max=last)
        lengths = self.upload([len(p) for p in prompts])
        with nvtx_range("decodekit.forward", int(ids.numel())):
            logits = self.forward(ids.to(self.device), pos.to(self.device), lengths, first_slot,
                                  self.kv_len(max(len(p) for p in prompts)))
        return logits[:, -1]

    def prefill_span(self, tokens: Sequence[int], slot: int, start: int, end: int) -> torch.Tensor:
        """Forward positions ``start .. end - 1`` of one slot's ``tokens`` (those before
        ``start`` are in its cache already) and return the logits ``[end - start, V]`` of
        every one of them: a chunk of a prefill whose prompt log-probabilities are wanted."""
        if self.kv is not None:
            self.kv.sync()
        ids = torch.tensor([list(tokens[start:end])], dtype=torch.long)
        pos = torch.arange(start, end, dtype=torch.long)[None]
        with nvtx_range("decodekit.forward", end - start):
            logits = self.forward(ids.to(self.device), pos.to(self.device), self.upload([end]), slot,
                                  self.kv_len(end), keep=end - start)
        return logits[0]

    def step_rows(self, slots: Sequence[int]) -> int:
        """How many batch rows a decode or window step over ``slots`` computes: every slot from
        the lowest to the highest eagerly (free ones between them too), ``0 .. max(slots)`` when
        a captured graph runs it (the decode graphs' buckets stand for the windows' here)."""
        hi = max(slots) + 1
        g = self.steered_graphs if self.steered else self.graphs
        return hi if g is not None and g.ready(hi) else hi - min(slots)

    def decode(self, slots: Sequence[int], lengths: Sequence[int]) -> Rows:
        """One decode forward for ``slots``: each one's newest token at position ``lengths[slot]``.

        Runs slots ``min(slots) .. max(slots)`` (``0 .. max(slots)`` as a CUDA graph of the bucket
        when one is ready: the steered set when a slot is steered), with one upload for the
        step's integer inputs. Returns the logits ``[R, V]`` of the rows in order and the slot
        index on the device.
        """
        hi = max(slots) + 1
        g = self.steered_graphs if self.steered else self.graphs
        graphs = g is not None and g.ready(hi)
        first = 0 if graphs else min(slots)  # eager: the rows below the lowest slot are skipped
        n_fill = g.bucket(hi) if graphs else hi - first  # a graph runs its whole bucket
        lens, s = self._lengths(lengths, first, n_fill), np.asarray(slots, dtype=np.int64)
        r = s - first  # the slots' rows
        owned = lens > 0
        pos = np.where(owned, np.minimum(lens, self.max_seq_len - 1), 0)  # idle rows: own free position
        pos[r] = lens[r]
        length = np.where(owned, pos + 1, 0)
        widths = None
        if not graphs and len(slots) < n_fill and self.window_packed(slots):
            widths = np.zeros(n_fill, dtype=np.int64)
            widths[r] = 1
            widths = round_packed(widths, 1)
        if widths is not None:
            # rows in the range that are not run (finished, free) stay out of the forward
            idx, idx32, pos_d, len_d, pack, unpack, rows = self.uploads.put(
                s, s.astype(np.int32), pos, length, *_packing(widths, 1), np.cumsum(widths)[r] - 1)
            with nvtx_range("decodekit.forward", len(slots)):
                logits = self._forward_packed(self.last_tokens[first:hi, None], pos_d[:, None], len_d, first,
                                              self.kv_len(int(lens[r].max()) + 1), pack, unpack)
            return Rows(logits.index_select(0, rows), idx, idx32)
        idx, idx32, rows, pos_d, len_d = self.uploads.put(s, s.astype(np.int32), r, pos, length)
        with nvtx_range("decodekit.forward", n_fill):
            if graphs:
                logits = g.run(n_fill, pos_d, len_d)
            else:
                logits = self.forward(self.last_tokens[first:hi, None], pos_d[:, None], len_d, first,
                                      self.kv_len(int(lens[r].max()) + 1))
        return Rows(logits[:, -1].index_select(0, rows), idx, idx32)

    def decode_at(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One decode forward over slots ``0..n-1``: ``tokens [n]`` at ``pos [n]`` (device), each
        row seeing its positions up to ``pos``. Replays a decode graph when one is ready (the
        bucket's extra rows write at the cache's last position, which no request holds), else
        eager over ``kv_len`` positions. ``tokens`` become the newest-token buffer's first
        ``n`` entries. Returns the logits ``[n, V]`` (a graph's are valid until its next
        replay)."""
        n = pos.shape[0]
        self.last_tokens[:n].copy_(tokens)
        g = self.steered_graphs if self.steered else self.graphs
        if g is not None and g.ready(n):
            with nvtx_range("decodekit.forward", g.bucket(n)):
                return g.run_padded(pos, pos + 1, self.cache.max_seq_len - 1)
        with nvtx_range("decodekit.forward", n):
            return self.forward(self.last_tokens[:n, None], pos[:, None], pos + 1, 0, kv_len)[:, -1]

    def window(self, slots: Sequence[int], drafts: torch.Tensor, lengths: Sequence[int],
               n_draft: Sequence[int] = ()) -> Rows:
        """The verification forward of a speculative step: per row, its newest token then its
        drafts ``drafts [R, K]`` (device, -1 = none; fed as token 0 and never accepted), at
        positions ``lengths[slot] ..``. Replays the window graph of the smallest captured width
        ``>= K + 1`` when one is ready (its extra columns are pads past the window, outside
        every row's length). One upload carries the step's integers, ``n_draft`` (drafts per
        row) among them. Returns the logits ``[R, K + 1, V]``, the slot index and ``n_draft``
        on the device."""
        K = drafts.shape[1]
        q = K + 1
        hi = max(slots) + 1
        sets = self.steered_window_graphs if self.steered else self.window_graphs
        width = next((w for w in sorted(sets) if w >= q), 0)
        g = sets.get(width)
        graphs = g is not None and g.ready(hi)
        first = 0 if graphs else min(slots)  # eager: the rows below the lowest slot are skipped
        qq, n_fill = (width, g.bucket(hi)) if graphs else (q, hi - first)
        lens, s = self._lengths(lengths, first, n_fill), np.asarray(slots, dtype=np.int64)
        r = s - first  # the slots' rows
        owned = (lens > 0)[:, None]
        pos = np.where(owned, lens[:, None], 0) + np.arange(qq)  # idle rows: their free positions
        pos = np.minimum(pos, self.cache.max_seq_len - 1)
        length = np.where(owned[:, 0], lens + 1, 0)
        length[r] = lens[r] + q  # the pads past the window stay outside
        extra: tuple[np.ndarray, ...] = ()
        packed = not graphs and len(n_draft) == len(slots) and self.window_packed(slots)
        if packed:  # the real cells only: each row's newest token and its own drafts
            real = np.zeros(n_fill, dtype=np.int64)
            real[r] = np.asarray(n_draft, dtype=np.int64) + 1
            widths = round_packed(real, qq)
            packed = widths is not None  # None: the full grid (it runs as it is)
        if packed:
            starts = np.cumsum(widths) - widths  # each row's first token among the N
            out = starts[r][:, None] + np.minimum(np.arange(q)[None, :], real[r][:, None] - 1)
            extra = (*_packing(widths, qq), out.reshape(-1))
        idx, idx32, rows, pos_d, len_d, nd, *packing = self.uploads.put(
            s, s.astype(np.int32), r, pos.reshape(-1), length, np.asarray(n_draft, dtype=np.int64), *extra)
        # the static window buffer serves eager windows too (no allocation per step)
        ids = self.window_ids[:n_fill, :qq] if qq <= self.window_ids.shape[1] else \
            torch.empty(n_fill, qq, dtype=torch.long, device=self.device)
        ids[:, 0] = self.last_tokens[first:first + n_fill]
        ids[:, 1:] = 0
        ids[rows, 1:q] = drafts.clamp(min=0)
        kv_len = self.kv_len(int(lens[r].max()) + q) if not graphs else 0
        if packed:
            pack, unpack, out_d = packing
            with nvtx_range("decodekit.forward", int(pack.shape[0])):
                logits = self._forward_packed(ids, pos_d.view(n_fill, qq), len_d, first, kv_len, pack, unpack)
            return Rows(logits.index_select(0, out_d).view(len(slots), q, -1), idx, idx32, nd)
        with nvtx_range("decodekit.forward", n_fill * qq):
            if graphs:
                logits = g.run(n_fill, pos_d, len_d)
            else:
                logits = self.forward(ids, pos_d.view(n_fill, qq), len_d, first, kv_len, keep=q)
        return Rows(logits.index_select(0, rows)[:, :q], idx, idx32, nd)

    def window_packed(self, slots: Sequence[int]) -> bool:
        """Whether an eager verification window over ``slots`` runs packed (only the real
        tokens through the model; so do eager decode steps with rows between the slots that
        are not run): on a runner that packs, when no slot is steered or has a LoRA adapter
        and no window graph is ready for it."""
        if not self.packs_windows or self.steered:
            return False
        return not any(g.ready(max(slots) + 1) for g in self.window_graphs.values())

    def _lengths(self, lengths: Sequence[int], first: int, n: int) -> np.ndarray:
        """Slot lengths ``first .. first + n - 1`` as int64 (0: free)."""
        return np.asarray(lengths[first:first + n], dtype=np.int64)

    # ------------------------------------------------------------------ CUDA graphs
    def enable_graphs(self, capture: Capture | None = None, window: int = 0) -> None:
        """Capture the decode forward per batch-size bucket now (call while no slot is in use),
        and with ``window = k`` the verification windows of up to ``k`` drafts per width of
        :func:`window_widths` (they need ``k + 1`` scratch positions per slot). ``capture``
        defaults to CUDA graph capture; pass :func:`~decodekit.engine.graphs.eager_capture` to
        run the same logic on a CPU. Buckets whose capture fails run eagerly (with a warning)."""
        if self.kv is not None:
            self.kv.sync()  # freed slots' tables point at the null block before capture writes
        if window and window + 1 > self.window_ids.shape[1]:
            raise ValueError(f"window {window} needs {window + 1} scratch positions per slot, "
                             f"the runner has {self.window_ids.shape[1]}")

        def forward(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            b, q = pos.shape
            if q == 1:
                return self.forward(self.last_tokens[:b, None], pos, length, 0, self.max_seq_len)
            return self.forward(self.window_ids[:b, :q], pos, length, 0, self.cache.max_seq_len, keep=q)

        def steered(pos: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            with self.every_hook():  # the tables are read inside the graph
                return forward(pos, length)

        kinds = [(False, forward)] + ([(True, steered)] if self.hooked else [])
        pool = None
        with torch.inference_mode():
            for is_steered, fn in kinds:
                tag = "steered " if is_steered else ""
                sets = {}
                for width in [1] + (window_widths(window) if window else []):
                    name = f"{tag}decode" if width == 1 else f"{tag}window {width}"
                    g = DecodeGraphs(fn, self.max_slots, self.device, capture, width=width, pool=pool,
                                     name=name)
                    g.capture_all()
                    pool = g.pool  # every set shares one memory pool
                    sets[width] = g
                if is_steered:
                    self.steered_graphs = sets.pop(1)
                    self.steered_window_graphs = sets
                else:
                    self.graphs = sets.pop(1)
                    self.window_graphs = sets


def _packing(widths: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Host indices of a packed forward over a grid of ``len(widths)`` rows by ``q`` cells
    whose row ``b`` holds tokens in its first ``widths[b]`` cells: ``(pack [N]`` (the cells,
    row-major), ``unpack [B * q])`` (each cell's token, ``N`` for none)."""
    pack = np.flatnonzero(np.arange(q)[None, :] < np.asarray(widths)[:, None])
    unpack = np.full(len(widths) * q, pack.size, dtype=np.int64)
    unpack[pack] = np.arange(pack.size)
    return pack.astype(np.int64), unpack


PACK_MULTIPLE = 8  # packed forwards carry a multiple of this many tokens


def round_packed(widths: np.ndarray, q: int) -> np.ndarray | None:
    """Row widths of a packed forward over a grid of ``len(widths)`` rows by ``q`` cells
    that carries ``widths[b]`` tokens in row ``b``: the total rounded up to a multiple of
    :data:`PACK_MULTIPLE` by taking cells after rows' tokens (token 0, written past the
    row's length like a padded grid's pads; rows with tokens first), or None when that is
    the whole grid. CPU matrix products have fast paths at such sizes: SmolLM2 on 2 cores,
    8 rows, 13 tokens cost 1.20 decode steps and 16 cost 1.04."""
    total = int(widths.sum())
    target = -(-total // PACK_MULTIPLE) * PACK_MULTIPLE
    if target >= widths.shape[0] * q:
        return None
    out = widths.copy()
    for b in [*np.flatnonzero(widths > 0), *np.flatnonzero(widths == 0)]:
        take = min(q - int(out[b]), target - total)
        out[b] += take
        total += take
        if total == target:
            break
    return out
