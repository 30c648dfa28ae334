"""KV-cache blocks: who holds which block, and which full blocks hold which tokens.

The paged KV cache (:class:`~decodekit.engine.kv_cache.PagedKVCache`) stores every
request's keys and values in fixed-size blocks of ``block_size`` positions. This module is
the bookkeeping, on the host, with no tensors:

- :class:`BlockPool` hands blocks out and takes them back with reference counts. Block 0
  is the *null block*: never handed out, every unused block-table entry points at it, so
  writes that belong to nobody (pad columns, idle rows) land there and are never read.
- **Prefix caching.** A full block can be registered under the key of its content
  (:func:`block_keys`: a hash chain over the tokens of that block and every block before
  it, salted with whatever else changes the keys and values, e.g. steering). When its last
  holder lets go, a registered block is not freed but parked in an LRU list: a later
  request whose prompt starts with the same tokens takes it back (:meth:`BlockPool.lookup`)
  instead of recomputing it. Parked blocks are evicted, oldest first, only when no free
  block is left.
- **Copy on write.** A block may have several holders (prefix hits, forks); a holder that
  is about to write into a shared block asks :meth:`BlockPool.writable` first, which hands
  it a private block to copy into (the caller copies the tensors).

Plain bookkeeping; calls nothing else in decodekit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["NULL_BLOCK", "BlockPool", "OutOfBlocks", "block_keys"]

NULL_BLOCK = 0


class OutOfBlocks(RuntimeError):
    """No free or evictable block is left (the caller preempts a request or refuses one)."""


def block_keys(tokens: Sequence[int], block_size: int, salts: Sequence[bytes] = (),
               parent: bytes = b"") -> list[bytes]:
    """Keys of the full blocks of ``tokens``: ``key[i] = H(key[i-1], salt[i], tokens of
    block i)`` (BLAKE2b, 16 bytes), so a key names a block's content *and* everything before
    it. ``salts[i]`` (default empty) carries what else changes block ``i``'s keys and
    values; ``parent`` is the key before the first block."""
    keys, key = [], parent
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(key, digest_size=16)
        h.update(salts[i] if i < len(salts) else b"")
        h.update(b"|")
        h.update(",".join(map(str, tokens[i * block_size:(i + 1) * block_size])).encode())
        key = h.digest()
        keys.append(key)
    return keys


class BlockPool:
    """``num_blocks`` blocks (block 0 reserved as the null block) with reference counts,
    prefix-cache keys and an LRU list of parked (registered, unheld) blocks.

    Parameters
    ----------
    num_blocks : int
        Blocks in the cache, the null block included (at least 2).
    """

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(f"num_blocks must be an int >= 2 (block 0 is reserved), got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low blocks first
        self._key_of: dict[int, bytes] = {}  # registered block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> registered block
        self._parked: OrderedDict[int, None] = OrderedDict()  # registered, unheld; oldest first
        self.hits = 0  # blocks handed back out of the prefix cache
        self.evictions = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_usable(self) -> int:
        """Blocks that can be handed out now: free plus parked."""
        return len(self._free) + len(self._parked)

    @property
    def num_free(self) -> int:
        """Blocks holding nothing (parked ones excluded)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered blocks (held or parked)."""
        return len(self._key_of)

    def refs(self, block: int) -> int:
        """Holders of ``block``."""
        return self._refs[block]

    # ------------------------------------------------------------------ handing out
    def allocate(self) -> int:
        """A block with one holder: a free one, else the oldest parked one (its key is
        forgotten). ``OutOfBlocks`` when neither is left."""
        if self._free:
            block = self._free.pop()
        elif self._parked:
            block, _ = self._parked.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
            self.evictions += 1
        else:
            raise OutOfBlocks(f"all {self.num_blocks - 1} KV blocks are held")
        self._refs[block] = 1
        return block

    def claim(self, block: int) -> int | None:
        """Hand out this very ``block`` (one holder now) when no one holds it: for a caller
        with a layout preference. A parked block's content first moves to a free block, which
        is returned (the caller copies ``block`` there before writing into it; the key follows
        the content); with no free block left the parked content is evicted instead. None:
        nothing to copy. ``ValueError`` when ``block`` is held or out of range."""
        if not (0 < block < self.num_blocks) or self._refs[block] > 0:
            raise ValueError(f"block {block} cannot be claimed (null block, out of range, or held)")
        moved = None
        if block in self._parked:
            del self._parked[block]
            key = self._key_of.pop(block)
            if self._free:
                moved = self._free.pop()
                self._key_of[moved] = key
                self._block_of[key] = moved
                self._parked[moved] = None
            else:
                del self._block_of[key]
                self.evictions += 1
        else:
            self._free.remove(block)
        self._refs[block] = 1
        return moved

    def share(self, block: int) -> None:
        """One more holder of a held ``block`` (a fork)."""
        self._check_held(block)
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """One holder fewer; at none, a registered block is parked and any other is freed."""
        self._check_held(block)
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._key_of:
                self._parked[block] = None
            else:
                self._free.append(block)

    def writable(self, block: int) -> int:
        """The block a holder of ``block`` may write into: ``block`` itself when it is the only
        holder and the block is not registered (registered content must stay what its key
        says), else a fresh block (the holder lets go of ``block``; the caller copies the
        contents over)."""
        self._check_held(block)
        if self._refs[block] == 1 and block not in self._key_of:
            return block
        fresh = self.allocate()  # first: on OutOfBlocks nothing changed
        self.release(block)
        return fresh

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, key: bytes) -> int | None:
        """The registered block with ``key``, now with one more holder, or None."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self._refs[block] == 0:
            del self._parked[block]
        self._refs[block] += 1
        self.hits += 1
        return block

    def register(self, block: int, key: bytes) -> bool:
        """Name a held, full ``block`` by ``key``. False (nothing changes) when the key names
        another block already or this block has a key."""
        self._check_held(block)
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def key(self, block: int) -> bytes | None:
        """The key ``block`` is registered under, if any."""
        return self._key_of.get(block)

    def _check_held(self, block: int) -> None:
        if not (0 < block < self.num_blocks) or self._refs[block] <= 0:
            raise ValueError(f"block {block} is not held (null block, out of range, or free)")
