"""Multi-adapter LoRA: the added term ``scale[l] * (x A[l]^T) B[l]^T`` of each token's adapter ``l``.

The adapters live in preallocated tables, one per targeted linear layer: ``A [L + 1, R, K]``,
``B [L + 1, N, R]`` and ``scale [L + 1]`` (slot 0 is "no adapter"; a smaller rank is zero
padded up to ``R``). A batch is ``S`` segments (request rows) of ``Q`` tokens, each segment
with one adapter slot; :class:`SlotGroups` sorts the segments by slot on the device (no host
sync, fixed buffers), and the two kernels walk each slot's group of tokens in tiles, so that a
tile's tokens share one adapter and its weights are read once per tile:

- shrink: ``h[s, q] = x[s, q] A[l]^T`` (``[R]``, fp32), one program per (slot, token tile);
- expand: ``y[s, q] += scale[l] * h[s, q] B[l]^T``, one program per (slot, token tile, output
  tile), in place, with one rounding to ``y``'s dtype. Tokens of slot 0 are never touched (they
  stay bit-identical), and their ``h`` is never written.

Both grids depend on static sizes only (segments, tokens, slots), never on the slots' contents,
so they can be captured in a CUDA graph with the slots in a static buffer. Tiles are widened to
fp32 after loading and products accumulate in fp32: the shrink of fp16/bf16 inputs in TF32 (their
values are exact in it, so the products are exact, on tensor cores), fp32 inputs and the expand
(whose ``h`` is fp32) with IEEE products. The torch reference is ``decodekit.lora.reference.lora_delta``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_pow2

__all__ = ["MAX_RANK", "SlotGroups", "aot_configs", "group_by_slot", "lora_add_", "lora_expand_",
           "lora_shrink", "tiles"]

MAX_RANK = 256  # the widest rank tile


@triton.jit
def _group_tokens(counts_ptr, ends_ptr, order_ptr, pid, n_tiles, Q, BLOCK_T: tl.constexpr):
    """Slot ``l``, tile ``j`` of program ``pid``: its tokens' segments and positions, and a mask."""
    slot = pid // n_tiles + 1
    tile = pid % n_tiles
    count = tl.load(counts_ptr + slot).to(tl.int32)
    start = tl.load(ends_ptr + slot).to(tl.int32) - count
    g = tile * BLOCK_T + tl.arange(0, BLOCK_T)  # token rank inside the slot's group
    ok = g < count * Q
    seg = tl.load(order_ptr + start + g // Q, mask=ok, other=0).to(tl.int64)
    return slot.to(tl.int64), seg, g % Q, ok, tile * BLOCK_T < count * Q


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, counts_ptr, ends_ptr, order_ptr,
                   Q, K, R, n_tiles, sx_s, sx_q, sa_l, sa_r,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    slot, seg, tok, ok, live = _group_tokens(counts_ptr, ends_ptr, order_ptr, tl.program_id(0), n_tiles, Q,
                                             BLOCK_T)
    if live:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        kk = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + seg[:, None] * sx_s + tok[:, None].to(tl.int64) * sx_q
        a_rows = a_ptr + slot * sa_l + r[:, None].to(tl.int64) * sa_r
        acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_rows + k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(a), input_precision="ieee")
            else:  # fp16/bf16 values are exact in TF32: exact products on tensor cores
                acc += tl.dot(x, tl.trans(a), input_precision="tf32")
        # h [S, Q, R] fp32, contiguous
        h_off = (seg[:, None] * Q + tok[:, None].to(tl.int64)) * R + r[None, :]
        tl.store(h_ptr + h_off, acc, mask=ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(h_ptr, b_ptr, scale_ptr, y_ptr, counts_ptr, ends_ptr, order_ptr,
                   Q, N, R, n_tiles, sy_s, sy_q, sb_l, sb_n,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    slot, seg, tok, ok, live = _group_tokens(counts_ptr, ends_ptr, order_ptr, tl.program_id(0), n_tiles, Q,
                                             BLOCK_T)
    if live:
        r = tl.arange(0, BLOCK_R)
        r_ok = r < R
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        h_off = (seg[:, None] * Q + tok[:, None].to(tl.int64)) * R + r[None, :]
        h = tl.load(h_ptr + h_off, mask=ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + slot * sb_l + n[:, None].to(tl.int64) * sb_n + r[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(h, tl.trans(b), input_precision="ieee")  # [BLOCK_T, BLOCK_N]
        scale = tl.load(scale_ptr + slot).to(tl.float32)
        y_off = seg[:, None] * sy_s + tok[:, None].to(tl.int64) * sy_q + n[None, :]
        mask = ok[:, None] & n_ok[None, :]
        y = tl.load(y_ptr + y_off, mask=mask, other=0.0)
        tl.store(y_ptr + y_off, (y.to(tl.float32) + scale * acc).to(y.dtype), mask=mask)


class SlotGroups:
    """Preallocated buffers of :meth:`fill`: a step can then live in a CUDA graph with fixed addresses.

    ``fill(slots)`` groups ``S <= max_segments`` segments by adapter slot, on the device and
    without a host sync, and returns ``(order [S] int64, counts [num_slots] int32, ends
    [num_slots] int32)``: the segments sorted by slot (stable), how many segments each slot has,
    and the end of each slot's run in ``order`` (``order`` is a view of a buffer).
    """

    def __init__(self, max_segments: int, num_slots: int, device: torch.device | str) -> None:
        kw = dict(device=device)
        self.sorted = torch.empty(max_segments, dtype=torch.int64, **kw)  # [S_max]
        self.order = torch.empty(max_segments, dtype=torch.int64, **kw)  # [S_max]
        self.ones = torch.ones(max_segments, dtype=torch.int32, **kw)  # [S_max]
        self.counts = torch.zeros(num_slots, dtype=torch.int32, **kw)  # [L + 1]
        self.ends = torch.zeros(num_slots, dtype=torch.int32, **kw)  # [L + 1]

    def fill(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group ``slots [S]`` (int64, values in ``[0, num_slots)``)."""
        S = slots.shape[0]
        if slots.dtype != torch.int64 or S > self.order.shape[0]:
            raise ValueError(f"slots must be int64 [<= {self.order.shape[0]}], got {slots.dtype} {S}")
        torch.sort(slots, stable=True, out=(self.sorted[:S], self.order[:S]))
        self.counts.zero_()
        self.counts.scatter_add_(0, slots, self.ones[:S])
        torch.cumsum(self.counts, 0, dtype=torch.int32, out=self.ends)
        return self.order[:S], self.counts, self.ends


def group_by_slot(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`SlotGroups.fill` into fresh buffers: ``(order [S], counts [num_slots], ends [num_slots])``."""
    return SlotGroups(max(slots.shape[0], 1), num_slots, slots.device).fill(slots)


def tiles(T: int, R: int) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_R, BLOCK_K, BLOCK_N)`` for a launch over ``T`` tokens with rank ``R``.

    A token tile holds tokens of one slot; how many a slot has is device data, so the tile
    follows the batch's total: 16 for decode-sized batches, up to 64 (32 for ranks above 64).
    """
    block_r = next_pow2(R, 16)
    block_t = 16 if T <= 16 else 32 if T <= 256 or block_r > 64 else 64
    return (block_t, block_r, *_inner_tiles(block_r))


def _inner_tiles(block_r: int) -> tuple[int, int]:
    """``(BLOCK_K, BLOCK_N)``: the shrink's reduction tile and the expand's output tile."""
    return max(16, min(64, 4096 // block_r)), max(16, min(128, 4096 // block_r))


def _check(x: torch.Tensor, table: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor) -> None:
    if x.dim() != 3 or x.stride(2) != 1:
        raise ValueError(f"expected [S, Q, features] contiguous in the last dim, got {tuple(x.shape)}")
    if table.dim() != 3 or not table.is_contiguous():
        raise ValueError(f"LoRA tables must be contiguous [L + 1, ., .], got {tuple(table.shape)}")
    if table.dtype != x.dtype:
        raise ValueError(f"LoRA tables ({table.dtype}) must have the activations' dtype ({x.dtype})")
    if counts.shape != (table.shape[0],) or ends.shape != (table.shape[0],):
        raise ValueError(f"counts and ends must be [{table.shape[0]}] (one per slot)")


def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: torch.Tensor, counts: torch.Tensor,
                ends: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    """``h [S, Q, R]`` fp32 with ``h[s, q] = x[s, q] A[slot(s)]^T`` for the segments of slots >= 1
    (rows of slot 0 are left unwritten). ``x [S, Q, K]``, ``a [L + 1, R, K]`` (x's dtype),
    ``order``/``counts``/``ends`` from :func:`group_by_slot`."""
    S, Q, K = x.shape
    _check(x, a, counts, ends)
    L1, R, Ka = a.shape
    if Ka != K or R > MAX_RANK:
        raise ValueError(f"x {tuple(x.shape)} does not fit A {tuple(a.shape)} (rank <= {MAX_RANK})")
    if h is None:
        h = torch.empty(S, Q, R, device=x.device, dtype=torch.float32)
    block_t, block_r, block_k, _ = tiles(S * Q, R)
    n_tiles = cdiv(S * Q, block_t)
    go = launch(((L1 - 1) * n_tiles,), block_t * block_r)
    _shrink_kernel[go.grid](
        x, a, h, counts, ends, order, Q, K, R, n_tiles, x.stride(0), x.stride(1), a.stride(0), a.stride(1),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k,
        IEEE=x.dtype == torch.float32, num_warps=go.num_warps,
    )
    return h


def lora_expand_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, order: torch.Tensor,
                 counts: torch.Tensor, ends: torch.Tensor) -> None:
    """``y[s, q] += scale[l] * h[s, q] B[l]^T`` in place for the segments of slots ``l >= 1``.
    ``y [S, Q, N]``, ``h [S, Q, R]`` fp32 (:func:`lora_shrink`), ``b [L + 1, N, R]``, ``scale [L + 1]``
    fp32."""
    S, Q, N = y.shape
    _check(y, b, counts, ends)
    L1, Nb, R = b.shape
    if Nb != N or h.shape != (S, Q, R) or h.dtype != torch.float32 or not h.is_contiguous():
        raise ValueError(f"y {tuple(y.shape)}, h {tuple(h.shape)} {h.dtype} and B {tuple(b.shape)} "
                         "do not fit")
    if scale.shape != (L1,) or scale.stride(0) != 1:
        raise ValueError(f"scale must be [{L1}] contiguous, got {tuple(scale.shape)}")
    block_t, block_r, _, block_n = tiles(S * Q, R)
    n_tiles = cdiv(S * Q, block_t)
    go = launch(((L1 - 1) * n_tiles, cdiv(N, block_n)), block_t * block_n)
    _expand_kernel[go.grid](
        h, b, scale, y, counts, ends, order, Q, N, R, n_tiles, y.stride(0), y.stride(1), b.stride(0),
        b.stride(1), BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n, num_warps=go.num_warps,
    )


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
              order: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor) -> None:
    """``y [S, Q, N] += scale * (x A^T) B^T`` per segment's adapter, in place (shrink, then expand)."""
    lora_expand_(y, lora_shrink(x, a, order, counts, ends), b, scale, order, counts, ends)


_DTYPES = ("fp32", "bf16", "fp16")


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every launch: each dtype (the tables share the activations' dtype) with every
    (token tile, rank tile) pair :func:`tiles` can pick (ranks 16 to 256)."""
    pairs = [(t, r) for r in (16, 32, 64, 128, 256) for t in (16, 32, 64) if t <= (64 if r <= 64 else 32)]
    for dt in _DTYPES:
        for block_t, block_r in pairs:
            block_k, block_n = _inner_tiles(block_r)
            sig = {"x_ptr": f"*{dt}", "a_ptr": f"*{dt}", "h_ptr": "*fp32",
                   "counts_ptr": "*i32", "ends_ptr": "*i32", "order_ptr": "*i64"}
            sig |= {k: "i32" for k in ("Q", "K", "R", "n_tiles", "sx_s", "sx_q", "sa_l", "sa_r")}
            cfg = dict(BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, IEEE=dt == "fp32")
            yield "lora_shrink", _shrink_kernel, sig, cfg, launch((1,), block_t * block_r).num_warps
            sig = {"h_ptr": "*fp32", "b_ptr": f"*{dt}", "scale_ptr": "*fp32", "y_ptr": f"*{dt}",
                   "counts_ptr": "*i32", "ends_ptr": "*i32", "order_ptr": "*i64"}
            sig |= {k: "i32" for k in ("Q", "N", "R", "n_tiles", "sy_s", "sy_q", "sb_l", "sb_n")}
            cfg = dict(BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_N=block_n)
            yield "lora_expand", _expand_kernel, sig, cfg, launch((1,), block_t * block_n).num_warps
