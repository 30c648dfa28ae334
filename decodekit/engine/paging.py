"""The block tables of a paged KV cache: which blocks each slot holds, on the host and on the
device.

:class:`KVBlocks` sits between the generator and a
:class:`~decodekit.engine.kv_cache.PagedKVCache`. The generator says what a slot is about
to hold or write (:meth:`KVBlocks.admit` for a prompt, :meth:`KVBlocks.prepare` before a
step writes positions ``start .. end``, :meth:`KVBlocks.free` when the request leaves); this
class takes blocks from its :class:`~decodekit.engine.blocks.BlockPool`, copies a shared
block before a slot writes into it (copy on write), and queues the changes. The runner calls
:meth:`KVBlocks.sync` before each forward: one upload of the changed table rows and one
batched block copy, nothing when nothing changed.

Prefix caching: :meth:`KVBlocks.admit` takes every cached full block of the prompt (keyed
by :func:`~decodekit.engine.blocks.block_keys`; at least the prompt's last token is left to
compute), and :meth:`KVBlocks.register` names the slot's full prompt blocks after the
prefill so later requests find them.

May call: :mod:`.blocks`, :mod:`.kv_cache`, :mod:`.staging`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .blocks import NULL_BLOCK, BlockPool, OutOfBlocks, block_keys
from .kv_cache import PagedKVCache
from .staging import StepUploads

__all__ = ["KVBlocks", "KVStats", "range_salts"]


@dataclass
class KVStats:
    """Counters of a paged cache since it was built."""

    prefix_hit_tokens: int = 0  # prompt tokens taken from cached blocks (not computed), prefilled requests
    copied_blocks: int = 0  # copy-on-write copies
    moved_blocks: int = 0  # cached blocks moved out of a slot's home range (the slot writes there)


def range_salts(tag: bytes, lo: int, hi: int, n_blocks: int, block_size: int) -> list[bytes]:
    """Per-block salts for ``n_blocks`` blocks of which positions ``[lo, hi)`` are changed by
    something named ``tag`` (a steering digest): a block's salt names ``tag`` and the part of
    the range it covers; blocks outside the range get no salt."""
    out = []
    for i in range(n_blocks):
        a, b = i * block_size, (i + 1) * block_size
        s, e = max(a, lo), min(b, hi)
        out.append(b"" if s >= e else hashlib.blake2b(tag + f"{s - a}:{e - a}".encode(),
                                                       digest_size=16).digest())
    return out


class KVBlocks:
    """Per-slot block lists of a :class:`PagedKVCache`, with prefix caching and copy on write.

    Parameters
    ----------
    cache : PagedKVCache
        The blocks' tensors and the device block tables.
    prefix_caching : bool
        Look prompts up in, and add them to, the prefix cache.
    home_copies : bool
        A prefix hit is copied into the slot's home blocks (when free) instead of shared:
        the prefill is still saved, and the row stays readable as a view (the CPU path,
        where a gather per layer costs more than a block copy per admission).
    """

    def __init__(self, cache: PagedKVCache, prefix_caching: bool = True, home_copies: bool = False) -> None:
        self.cache, self.prefix_caching, self.home_copies = cache, prefix_caching, home_copies
        self.block_size = cache.block_size
        self.pool = BlockPool(cache.num_blocks)
        self.stats = KVStats()
        self._held: list[list[int]] = [[] for _ in range(cache.max_slots)]
        self._host = np.zeros((cache.max_slots, cache.max_blocks), dtype=np.int64)  # NULL_BLOCK = 0
        self._dirty: set[int] = set()
        self._copies: list[tuple[int, int]] = []  # (src, dst) blocks to copy at the next sync
        self._hits: dict[int, int] = {}  # slot -> prefix tokens found at admission, not yet prefilled
        self._away = np.zeros(cache.max_slots, dtype=np.int64)  # held blocks outside the slot's home range
        # changed rows + copies travel in one pinned, non-blocking upload (no host sync)
        self._uploads = StepUploads(cache.max_slots * (cache.max_blocks + 1) + 2 * cache.max_slots,
                                    cache.block_tables.device)

    # ------------------------------------------------------------------ queries
    def blocks(self, slot: int) -> list[int]:
        """The blocks ``slot`` holds, in position order (a copy)."""
        return list(self._held[slot])

    @property
    def num_usable(self) -> int:
        """Blocks that can still be handed out (free or evictable)."""
        return self.pool.num_usable

    def home_rows(self, first_slot: int, n: int) -> bool:
        """Whether every block held by slots ``first_slot .. first_slot + n`` lies in its
        slot's home range (:meth:`PagedKVCache.home_block`): then the rows can be read as
        strided views, without a gather."""
        return self.cache.home_block(0, 0) is not None and not self._away[first_slot:first_slot + n].any()

    def blocks_for(self, tokens: int) -> int:
        """Blocks covering ``tokens`` positions."""
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------ requests
    def admit(self, slot: int, tokens: Sequence[int], salts: Sequence[bytes] = (), lookup: bool = True
              ) -> int:
        """``slot`` (holding nothing) takes blocks for ``tokens``: cached full blocks of its
        prefix first (prefix caching, unless not ``lookup``), fresh ones for the rest. Returns
        how many leading tokens are cached (their keys and values are there; the prefill
        starts after them). ``OutOfBlocks``: nothing is held."""
        if self._held[slot]:
            raise ValueError(f"slot {slot} already holds blocks")
        hits: list[int] = []
        if self.prefix_caching and lookup:
            limit = (len(tokens) - 1) // self.block_size  # the last token is always computed
            for key in block_keys(tokens[: limit * self.block_size], self.block_size, salts):
                block = self.pool.lookup(key)
                if block is None:
                    break
                hits.append(block)
        cached = len(hits) * self.block_size
        if self.home_copies:
            hits = [self._home_copy(slot, i, b) for i, b in enumerate(hits)]
        for i, block in enumerate(hits):
            self._mark(slot, i, block)
        self._held[slot] = hits  # prepare() appends the fresh blocks to this list
        try:
            self.prepare(slot, cached, len(tokens))
        except OutOfBlocks:
            self.free(slot)
            raise
        self._hits[slot] = cached  # counted once the prefill happened (register)
        return cached

    def prepare(self, slot: int, start: int, end: int) -> None:
        """Positions ``start .. end - 1`` of ``slot`` are about to be written: hold a block for
        each (clipped to the table), privately (a shared or cached block is copied first).
        ``OutOfBlocks`` leaves what was already done in place (consistent, just held)."""
        end = min(end, self.cache.max_blocks * self.block_size)
        held = self._held[slot]
        first, last = start // self.block_size, self.blocks_for(end)
        for i in range(first, last):
            if i < len(held):
                block = held[i]
                private = self.pool.writable(block)
                if private != block:
                    self._copies.append((block, private))
                    self.stats.copied_blocks += 1
                    held[i] = private
                    self._mark(slot, i, private)
            else:
                block = self._allocate(slot, i)
                held.append(block)
                self._mark(slot, i, block)

    def register(self, slot: int, tokens: Sequence[int], salts: Sequence[bytes] = ()) -> None:
        """Add the full blocks of ``tokens`` (what ``slot`` holds from position 0) to the
        prefix cache. A block whose content another block already caches stays private."""
        self.stats.prefix_hit_tokens += self._hits.pop(slot, 0)
        if not self.prefix_caching:
            return
        held = self._held[slot]
        for i, key in enumerate(block_keys(tokens, self.block_size, salts)):
            if i < len(held):
                self.pool.register(held[i], key)

    def fork(self, parent: int, child: int) -> None:
        """``child`` (holding nothing) shares every block of ``parent``; the first write into a
        shared block copies it (:meth:`prepare`)."""
        if self._held[child]:
            raise ValueError(f"slot {child} already holds blocks")
        for i, block in enumerate(self._held[parent]):
            self.pool.share(block)
            self._mark(child, i, block)
        self._held[child] = list(self._held[parent])

    def free(self, slot: int) -> None:
        """``slot`` lets go of every block (the last ones first, so the prefix cache evicts a
        prompt's tail before its head)."""
        self._hits.pop(slot, None)
        for block in reversed(self._held[slot]):
            self.pool.release(block)
        if self._held[slot]:
            self._held[slot] = []
            self._host[slot] = NULL_BLOCK
            self._away[slot] = 0
            self._dirty.add(slot)

    # ------------------------------------------------------------------ device
    def sync(self) -> None:
        """Apply the queued changes to the device (one upload): block copies, then the
        changed table rows."""
        if not (self._copies or self._dirty):
            return
        rows = sorted(self._dirty)
        src, dst = zip(*self._copies, strict=True) if self._copies else ((), ())
        r, table, s, d = self._uploads.put(rows, self._host[rows].reshape(-1), src, dst)
        start = 0
        for end in _copy_rounds(self._copies):  # in queue order where a copy reads an earlier one's
            self.cache.copy_blocks(s[start:end], d[start:end])
            start = end
        if rows:
            self.cache.block_tables.index_copy_(0, r, table.view(len(rows), -1))
        self._copies.clear()
        self._dirty.clear()

    def _allocate(self, slot: int, i: int) -> int:
        """A fresh block for entry ``i`` of ``slot``: its home block when no one holds it (a
        parked home block's content moves out first, copied at the next sync), else any."""
        home = self.cache.home_block(slot, i)
        if home is None or self.pool.refs(home) > 0:
            return self.pool.allocate()
        return self._claim(home)

    def _claim(self, home: int) -> int:
        """Take the unheld ``home`` block; cached content parked there is queued to move out."""
        moved = self.pool.claim(home)
        if moved is not None:
            self._copies.append((home, moved))
            self.stats.moved_blocks += 1
        return home

    def _home_copy(self, slot: int, i: int, block: int) -> int:
        """Entry ``i`` of ``slot`` gets a private copy of the cached ``block`` in its home block
        when that one is free to claim (the cached block goes back to the cache), else shares
        ``block``."""
        home = self.cache.home_block(slot, i)
        if home is None or home == block or self.pool.refs(home) > 0:
            return block
        self._copies.append((block, self._claim(home)))  # after the move out (sync keeps queue order)
        self.pool.release(block)
        return home

    def _mark(self, slot: int, i: int, block: int) -> None:
        home = self.cache.home_block(slot, i)
        old = int(self._host[slot, i])
        self._away[slot] += (block != home) - (old != NULL_BLOCK and old != home)
        self._host[slot, i] = block
        self._dirty.add(slot)


def _copy_rounds(copies: Sequence[tuple[int, int]]) -> list[int]:
    """Ends of the runs of ``copies`` (in queue order) that may be applied as one batched copy
    (every source read before any destination is written): a run ends before a copy that
    reads or writes a block an earlier copy of the run writes (a chain such as a cached block
    moved out of a home range and then copied again in the same sync)."""
    ends, written = [], set()
    for i, (a, b) in enumerate(copies):
        if a in written or b in written:
            ends.append(i)
            written = set()
        written.add(b)
    return ends + [len(copies)] if copies else []
