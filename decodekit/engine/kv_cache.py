"""KV caches behind transformers' ``Cache`` API: :class:`PagedKVCache` (blocks read through
per-row block tables, the default) and :class:`SlotKVCache` (one static row per slot).

The slot cache is created once: per layer ``keys``/``values`` of shape ``[slots, kv_heads, max_seq_len,
head_dim]``. Before each forward the generator says which slots the batch rows are
(a contiguous range, so the returned tensors are views, never copies) and where each
row writes (its own positions). The model's attention code runs unchanged: it calls
``update`` and attends over the returned keys/values with the 4D masks that
:meth:`SlotKVCache.attention_masks` builds (per-row lengths, sliding windows).

The paged cache keeps the same binding API (rows, write positions) and maps each position
through the row's block table; who holds which block is decided in :mod:`.paging`.

A *packed* forward (:meth:`SlotKVCache.bind` with ``packed``) feeds the model one row of
the batch's real tokens only (``[1, N]``, no padding); ``update`` spreads its keys and values
back over the rows' grid ``[B, H, q, D]`` before writing, so everything past it is unchanged.

Rolling a row back (speculative decoding) is only length bookkeeping in the
generator: positions past a row's length are masked out and overwritten later.

Calls nothing else in decodekit.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

__all__ = ["PagedKVCache", "SlotKVCache", "attention_masks", "kv_shape", "unpack_rows"]


def attention_masks(kind: str, windows: dict[str, int | None], q_pos: torch.Tensor,
                    length: torch.Tensor, kv_len: int, dtype):
    """The ``attention_mask`` argument for a model of layout ``(kind, windows)``
    (:func:`decodekit.engine.model_adapter.mask_layout`): one 4D mask, or a dict of them
    keyed by layer type."""
    masks = {k: SlotKVCache.attention_mask(q_pos, length, kv_len, w, dtype) for k, w in windows.items()}
    return masks if kind == "mapping" else masks["all"]


class _SlotLayer:
    """One layer's slot tensors (duck-types transformers' cache layer for ``update``)."""

    is_sliding = False
    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys  # [slots, kv_heads, max_seq_len, head_dim]
        self.values = values
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()


def kv_shape(config, tp_size: int = 1) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a transformers config; ``kv_heads`` is one rank's
    share under tensor parallelism of degree ``tp_size``."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, kv_heads // tp_size, head_dim


class SlotKVCache(Cache):
    """Static KV cache with one row (slot) per request.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        Supplies layer count, kv heads and head size.
    max_slots, max_seq_len : int
        Rows and positions per row.
    device, dtype
        Where and how the tensors live.
    """

    def __init__(self, config, max_slots: int, max_seq_len: int, device, dtype, *, tp_size: int = 1) -> None:
        n_layers, kv_heads, head_dim = kv_shape(config, tp_size)
        shape = (max_slots, kv_heads, max_seq_len, head_dim)
        layers = [
            _SlotLayer(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))
            for _ in range(n_layers)
        ]
        super().__init__(layers=layers)
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        self.kv_len = max_seq_len
        self._rows = slice(0, max_slots)
        self._rows_idx = torch.arange(max_slots, device=device)[:, None]
        self._write_pos: torch.Tensor | None = None
        self._unpack: torch.Tensor | None = None  # packed forwards: grid cell -> token (N: none)

    # ------------------------------------------------------------------ per step
    def bind(self, first_slot: int, write_pos: torch.Tensor, kv_len: int | None = None,
             length: torch.Tensor | None = None, home: bool = False,
             packed: torch.Tensor | None = None) -> None:
        """Rows ``first_slot .. first_slot + B`` write at ``write_pos [B, q]`` (int64);
        attention sees the first ``kv_len`` positions (default: all). ``length [B]``: each
        row's visible positions (the masks carry them; unused here). ``home``: the paged
        cache's hint (rows are views here anyway). ``packed [B * q]`` (int64): the forward
        is packed, its ``N`` tokens in one row; cell ``(b, j)`` of the grid holds token
        ``packed[b * q + j]``, ``N`` for none (zeros are written there)."""
        B = write_pos.shape[0]
        if first_slot < 0 or first_slot + B > self.max_slots:
            raise ValueError(f"slots {first_slot}..{first_slot + B} outside [0, {self.max_slots})")
        self._unpack = packed
        self._rows = slice(first_slot, first_slot + B)
        self._rows_idx = torch.arange(first_slot, first_slot + B, device=write_pos.device)[:, None]
        self._write_pos = write_pos
        self.kv_len = self.max_seq_len if kv_len is None else kv_len

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write ``key/value_states [B, H, q, D]`` at each row's positions; return the rows'
        ``[B, H, kv_len, D]`` views."""
        layer = self.layers[layer_idx]
        pos = self._write_pos
        if pos is None:
            raise RuntimeError("SlotKVCache.update before bind(): use it through TokenGenerator")
        key_states, value_states = self._grid(key_states), self._grid(value_states)
        # keys[slot, :, pos, :] = k[b, :, j, :] for every (b, j)
        layer.keys[self._rows_idx, :, pos] = key_states.transpose(1, 2).to(layer.keys.dtype)
        layer.values[self._rows_idx, :, pos] = value_states.transpose(1, 2).to(layer.values.dtype)
        n = self.kv_len
        return layer.keys[self._rows, :, :n], layer.values[self._rows, :, :n]

    def end_packed(self) -> None:
        """A packed forward is over: drop its index (the next ``bind`` says again)."""
        self._unpack = None

    def _grid(self, states: torch.Tensor) -> torch.Tensor:
        """``states [B, H, q, D]`` as given, or a packed forward's ``[1, H, N, D]`` spread
        over the bound grid ``[B, H, q, D]`` (cells without a token: zeros)."""
        if self._unpack is None:
            return states
        return unpack_rows(states, self._unpack, self._write_pos.shape)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.kv_len, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len

    @property
    def is_compileable(self) -> bool:
        return True

    # ------------------------------------------------------------------ masks
    @staticmethod
    def attention_mask(
        q_pos: torch.Tensor, length: torch.Tensor, kv_len: int, window: int | None, dtype
    ) -> torch.Tensor:
        """Additive mask ``[B, 1, q, kv_len]``: query at ``q_pos [B, q]`` sees key ``j`` iff
        ``j <= q_pos`` and ``j < length [B]`` (and ``j > q_pos - window`` if sliding)."""
        j = torch.arange(kv_len, device=q_pos.device)
        ok = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < length[:, None, None])
        if window is not None:
            ok &= j[None, None, :] > q_pos[:, :, None] - window
        # padding rows (length 0) attend to position 0 only, so softmax never sees an empty row
        ok |= (j[None, None, :] == 0) & (length[:, None, None] == 0)
        mask = torch.zeros(ok.shape, dtype=dtype, device=q_pos.device)
        mask.masked_fill_(~ok, torch.finfo(dtype).min)
        return mask[:, None]


def unpack_rows(states: torch.Tensor, unpack: torch.Tensor, grid: tuple[int, int] | torch.Size
                ) -> torch.Tensor:
    """A packed forward's per-token ``states [1, H, N, D]`` laid out on the rows' grid
    ``[B, H, q, D]`` (``grid = (B, q)``): cell ``(b, j)`` takes token ``unpack[b * q + j]``,
    zeros where that is ``N``."""
    B, q = grid
    x = states[0].transpose(0, 1)  # [N, H, D]
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
    return x.index_select(0, unpack).view(B, q, *x.shape[1:]).transpose(1, 2)


class _PagedLayer(_SlotLayer):
    """One layer's block tensors ``[num_blocks, block_size, kv_heads, head_dim]``."""

    def get_max_length(self) -> int:
        return self.keys.shape[0] * self.keys.shape[1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_max_length(), 0


class PagedKVCache(SlotKVCache):
    """KV cache in fixed-size blocks, read through per-row block tables.

    Per layer ``keys``/``values`` of shape ``[num_blocks, block_size, kv_heads, head_dim]``;
    :attr:`block_tables` ``[slots, max_seq_len / block_size]`` (int64, on the device) maps a
    row's position ``p`` to block ``block_tables[row, p // block_size]``, offset
    ``p % block_size``. Entries a row does not hold point at block 0 (the null block of
    :class:`~decodekit.engine.blocks.BlockPool`): writes there are lost, reads masked. Who
    holds which block is decided on the host (:mod:`.paging`); this class only moves data.

    Same binding API as :class:`SlotKVCache` (``bind`` then the model's ``update`` calls),
    so the model's attention runs unchanged: ``update`` writes the step's keys and values
    through the table and returns the row's first ``kv_len`` positions, gathered from its
    blocks into ``[B, kv_heads, kv_len, head_dim]`` (the torch reference path; a copy of
    the live prefix, sized by ``kv_len``).
    """

    def __init__(self, config, max_slots: int, max_seq_len: int, device, dtype, *, num_blocks: int,
                 block_size: int, tp_size: int = 1) -> None:
        n_layers, kv_heads, head_dim = kv_shape(config, tp_size)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        layers = [_PagedLayer(torch.zeros(shape, device=device, dtype=dtype),
                              torch.zeros(shape, device=device, dtype=dtype)) for _ in range(n_layers)]
        Cache.__init__(self, layers=layers)
        self.max_slots, self.max_seq_len, self.kv_len = max_slots, max_seq_len, max_seq_len
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_blocks = -(-max_seq_len // block_size)  # per row
        self.block_tables = torch.zeros(max_slots, self.max_blocks, dtype=torch.long, device=device)
        self._rows = slice(0, max_slots)
        self._write_pos: torch.Tensor | None = None
        self._write_block = self._write_off = self._read_blocks = None
        self._table = self._length = None
        self._scratch: list[torch.Tensor | None] = [None, None]  # gather buffers (keys, values)
        self._home: int | None = None  # bound rows read as views of their home ranges (first slot)
        self.kernel_attention = False  # update() returns the stores, the backend reads the tables

    @property
    def bytes_per_block(self) -> int:
        """Bytes of keys and values one block holds over every layer."""
        k = self.layers[0].keys
        return 2 * len(self.layers) * k[0].numel() * k.element_size()

    def home_block(self, slot: int, i: int) -> int | None:
        """Block ``i`` of ``slot``'s home range, ``1 + slot * max_blocks + i``, when the cache
        has a full-length range per slot (the default capacity), else None. A row whose
        blocks all lie in its home range is one strided view of the stores (no gather); the
        block tables still say where everything is."""
        if self.num_blocks < 1 + self.max_slots * self.max_blocks:
            return None
        return 1 + slot * self.max_blocks + i

    def bind(self, first_slot: int, write_pos: torch.Tensor, kv_len: int | None = None,
             length: torch.Tensor | None = None, home: bool = False,
             packed: torch.Tensor | None = None) -> None:
        """Rows ``first_slot .. first_slot + B`` write at ``write_pos [B, q]`` (int64);
        ``packed``: as :meth:`SlotKVCache.bind`. Attention sees their first ``kv_len``
        positions (default: all), each row its first ``length [B]`` (needed in kernel mode).
        The block indices are worked out here once for every layer. ``home``: every block the
        rows hold is in its home range (:meth:`home_block`; the caller knows, from the host
        tables), so reads are views of the stores instead of gathered copies (what the rows
        do not hold reads as whatever the range has: past each row's length, masked)."""
        B = write_pos.shape[0]
        if first_slot < 0 or first_slot + B > self.max_slots:
            raise ValueError(f"slots {first_slot}..{first_slot + B} outside [0, {self.max_slots})")
        self.kv_len = self.max_seq_len if kv_len is None else kv_len
        bs = self.block_size
        table = self.block_tables[first_slot:first_slot + B]  # [B, max_blocks]
        self._write_block = table.gather(1, write_pos // bs)  # [B, q]
        self._write_off = write_pos % bs
        self._read_blocks = table[:, : -(-self.kv_len // bs)]  # [B, nb]
        self._write_pos, self._table, self._length = write_pos, table, length
        self._home = first_slot if home and self.home_block(0, 0) is not None else None
        self._unpack = packed

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write ``key/value_states [B, H, q, D]`` into the rows' blocks; return the rows'
        first ``kv_len`` positions ``[B, H, kv_len, D]`` (gathered copies)."""
        if self._write_pos is None:
            raise RuntimeError("PagedKVCache.update before bind(): use it through TokenGenerator")
        layer = self.layers[layer_idx]
        key_states, value_states = self._grid(key_states), self._grid(value_states)
        blk, off = self._write_block, self._write_off
        layer.keys[blk, off] = key_states.transpose(1, 2).to(layer.keys.dtype)  # [B, q, H, D]
        layer.values[blk, off] = value_states.transpose(1, 2).to(layer.values.dtype)
        if self.kernel_attention:  # the attention kernel reads the blocks itself
            return layer.keys, layer.values
        return self._gather(layer.keys, 0), self._gather(layer.values, 1)

    def attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bound rows' ``(block_tables [B, max_blocks], lengths [B], positions [B, q])``:
        what the paged attention kernel needs besides the layer's stores."""
        if self._length is None:
            raise RuntimeError("PagedKVCache: kernel attention needs bind(..., length=...)")
        return self._table, self._length, self._write_pos

    def _gather(self, store: torch.Tensor, which: int) -> torch.Tensor:
        """The bound rows' first ``kv_len`` positions of ``store`` as ``[B, H, kv_len, D]``.

        ``index_select`` copies whole blocks (advanced indexing costs ~3x on CPU). On CPU the
        copy lands in a held buffer (``which``: 0 keys, 1 values), reused by every layer since a
        layer's attention is done with it before the next layer gathers: no fresh pages each
        call. Elsewhere a fresh tensor (a buffer replaced between CUDA-graph captures would
        leave an earlier graph writing into freed memory)."""
        B, nb = self._read_blocks.shape
        if self._home is not None:  # [B, kv_len, H, D] at a stride of one home range per row
            bs, H, D = store.shape[1:]
            row, base = self.max_blocks * bs * H * D, self.home_block(self._home, 0) * bs * H * D
            view = store.as_strided((B, self.kv_len, H, D), (row, H * D, D, 1), store.storage_offset() + base)
            return view.transpose(1, 2)
        n, idx = B * nb, self._read_blocks.reshape(-1)
        if store.device.type == "cpu":
            buf = self._scratch[which]
            if buf is None or buf.shape[0] < n:
                buf = self._scratch[which] = store.new_empty((n, *store.shape[1:]))
            rows = torch.index_select(store, 0, idx, out=buf[:n])  # [B * nb, bs, H, D]
        else:
            rows = store.index_select(0, idx)
        return rows.view(B, nb * self.block_size, *store.shape[2:])[:, : self.kv_len].transpose(1, 2)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's block ``dst[i]`` := block ``src[i]`` (int64 device tensors ``[n]``)."""
        for layer in self.layers:
            layer.keys.index_copy_(0, dst, layer.keys.index_select(0, src))
            layer.values.index_copy_(0, dst, layer.values.index_select(0, src))

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len
