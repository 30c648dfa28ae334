"""Attention over a paged KV cache, reading only each row's live blocks.

For every row ``b`` and query ``j`` (position ``q_pos[b, j]``), over the keys at positions
``p < seq_len[b]`` with ``p <= q_pos[b, j]`` (and ``p > q_pos[b, j] - window`` when sliding):

    s_p = softcap * tanh((q . k_p) * scale / softcap)     (plain (q . k_p) * scale without softcap)
    out = sum_p softmax(s)_p v_p

Keys and values live in blocks ``[num_blocks, block_size, kv_heads, head_dim]``; row ``b``'s
position ``p`` is in block ``block_tables[b, p // block_size]``. One program per (row, query
tile, KV head, split): the ``G = heads / kv_heads`` query heads that share a KV head are rows
of one tile (GQA without expanding K/V), keys stream block by block with an online softmax
(FlashAttention), and long contexts are split across programs (flash-decoding): each split
writes its unnormalised output with its running max and sum, and :func:`combine` merges them.
A query whose visible set is empty (a padding row) gets zeros. Tiles are widened to float32
after loading (the traffic stays in the cache's dtype; decode attention is bound by it):
fp16/bf16 values are exact in TF32, and fp32 models get IEEE products.

The launch shape depends only on static sizes (rows, queries, the block-table width), never on
the lengths, so a launch can be captured in a CUDA graph with the tables and lengths in static
buffers. The torch reference is ``decodekit.engine.attention.paged_attention_reference``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from .launch import cdiv, launch, next_pow2

__all__ = ["aot_configs", "combine", "paged_attention", "split_count"]


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, qpos_ptr, acc_ptr, ml_ptr,
        sq_b, sq_h, sq_q, sk_blk, sk_pos, sk_h, sv_blk, sv_pos, sv_h, st_b, sp_b,
        Q, n_qtiles, blocks_per_split, n_splits, scale, softcap, window,
        G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
        BS: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    b, qt = pid // n_qtiles, pid % n_qtiles
    kvh, split = tl.program_id(1), tl.program_id(2)
    b64 = b.to(tl.int64)
    r = qt * BLOCK_R + tl.arange(0, BLOCK_R)  # tile rows: query j of head g at r = j * G + g
    j, g = r // G, r % G
    row_ok = j < Q
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    h = kvh * G + g
    q = tl.load(q_ptr + b64 * sq_b + h[:, None].to(tl.int64) * sq_h + j[:, None] * sq_q + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    qpos = tl.load(qpos_ptr + b64 * sp_b + j, mask=row_ok, other=-1).to(tl.int32)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    # blocks this split reads: its share, cut to the keys any row of the tile can see
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(tl.minimum(seq_len, tl.max(qpos) + 1), BS))
    if WINDOW:
        lo = tl.maximum(tl.min(tl.where(row_ok, qpos, 1 << 30)) - window + 1, 0)
        first = tl.maximum(first, lo // BS)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    p_in = tl.arange(0, BS)
    for i in range(first, last):
        blk = tl.load(tables_ptr + b64 * st_b + i).to(tl.int64)
        k = tl.load(k_ptr + blk * sk_blk + p_in[:, None] * sk_pos + kvh * sk_h + d[None, :],
                    mask=d_ok[None, :], other=0.0).to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        pos = i * BS + p_in
        ok = (pos[None, :] < seq_len) & (pos[None, :] <= qpos[:, None]) & row_ok[:, None]
        if WINDOW:
            ok &= pos[None, :] > qpos[:, None] - window
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk * sv_blk + p_in[:, None] * sv_pos + kvh * sv_h + d[None, :],
                    mask=d_ok[None, :], other=0.0).to(tl.float32)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p, v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    # partials: acc [B, Hq, Q, S, D], (max, sum) [B, Hq, Q, S, 2], all float32, contiguous
    base = ((b64 * (G * tl.num_programs(1)) + h.to(tl.int64)) * Q + j) * n_splits + split
    tl.store(acc_ptr + base[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
    tl.store(ml_ptr + base * 2, m, mask=row_ok)
    tl.store(ml_ptr + base * 2 + 1, s_sum, mask=row_ok)


def split_count(rows: int, kv_heads: int, table_blocks: int, device: torch.device) -> int:
    """Splits per (row, KV head): enough programs to fill the device (about two per SM), at
    least 4 blocks each. A function of static sizes only (CUDA-graph safe)."""
    from .launch import num_sms

    want = cdiv(2 * num_sms(device), max(rows * kv_heads, 1))
    return max(1, min(want, cdiv(table_blocks, 4)))


def combine(acc: torch.Tensor, ml: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Merge the splits: ``acc [B, H, Q, S, D]``, ``ml [B, H, Q, S, 2]`` -> ``[B, H, Q, D]``.
    Rows that saw no key at all give zeros."""
    m, s = ml[..., 0], ml[..., 1]
    top = m.amax(-1, keepdim=True)
    w = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # [B, H, Q, S]
    den = (w * s).sum(-1, keepdim=True)
    out = (w[..., None] * acc).sum(-2) / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(out_dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, q_pos: torch.Tensor, scale: float,
                    softcap: float = 0.0, window: int = 0, splits: int | None = None) -> torch.Tensor:
    """Attention of ``q [B, H, Q, D]`` over a paged cache; returns ``[B, H, Q, D]`` in q's dtype.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, kv_heads, D]`` (last dim contiguous);
    ``block_tables``: int ``[B, max_blocks]``; ``seq_lens``: int ``[B]`` (keys ``< seq_len``
    exist); ``q_pos``: int ``[B, Q]`` (each query's position); ``softcap`` 0 and ``window`` 0
    mean none. ``splits`` (default :func:`split_count`) divides each row's table.
    """
    B, H, Q, D = q.shape
    _, BS, KVH, Dk = k_cache.shape
    if Dk != D or v_cache.shape != k_cache.shape or H % KVH:
        raise ValueError(f"q {tuple(q.shape)} does not fit k/v caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if q.stride(3) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    if block_tables.shape[0] != B or seq_lens.shape != (B,) or q_pos.shape != (B, Q):
        raise ValueError("block_tables [B, max_blocks], seq_lens [B] and q_pos [B, Q] must match q")
    if BS < 16 or BS & (BS - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {BS}")
    G = H // KVH
    block_d = next_pow2(D, 16)
    block_r = min(next_pow2(G * Q, 16), 128, max(16, 8192 // block_d))  # query rows: <= 128, tile <= 8K
    n_qtiles = cdiv(G * Q, block_r)
    table_blocks = block_tables.shape[1]
    S = splits or split_count(B * n_qtiles, KVH, table_blocks, q.device)  # prefill tiles fill the device
    per = cdiv(table_blocks, S)
    acc = torch.empty(B, H, Q, S, D, device=q.device, dtype=torch.float32)
    ml = torch.empty(B, H, Q, S, 2, device=q.device, dtype=torch.float32)
    go = launch((B * n_qtiles, KVH, S), block_r * block_d)
    _paged_attention_kernel[go.grid](
        q, k_cache, v_cache, block_tables, seq_lens, q_pos, acc, ml,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), q_pos.stride(0),
        Q, n_qtiles, per, S, float(scale), float(softcap or 1.0), int(window or 0),
        G=G, BLOCK_R=block_r, BLOCK_D=block_d, D=D, BS=BS, SOFTCAP=bool(softcap), WINDOW=bool(window),
        IEEE=q.dtype == torch.float32, num_warps=go.num_warps,
    )
    return combine(acc, ml, q.dtype)


SIGNATURE_PTRS = {"q_ptr": "*{t}", "k_ptr": "*{t}", "v_ptr": "*{t}", "tables_ptr": "*i64", "lens_ptr": "*i64",
                  "qpos_ptr": "*i64", "acc_ptr": "*fp32", "ml_ptr": "*fp32"}
SIGNATURE_INTS = ["sq_b", "sq_h", "sq_q", "sk_blk", "sk_pos", "sk_h", "sv_blk", "sv_pos", "sv_h", "st_b",
                  "sp_b", "Q", "n_qtiles", "blocks_per_split", "n_splits"]


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every tile shape the launcher can pick: each head_dim tile (32, 64, 128, 256; odd
    head dims round up to these; 16 only in tests) with every query-row count from 16 to the
    cap (128 rows, 8K elements), GQA groups of 1 to 8 spread over them, each dtype, with and
    without soft-capping / windows."""
    flags = ((False, False), (True, True), (False, True))
    for dt in ("fp32", "bf16", "fp16"):
        for n, (block_d, block_r) in enumerate((d, r) for d in (32, 64, 128, 256) for r in (16, 32, 64, 128)
                                               if r * d <= 8192):
            G = (1, 2, 4, 8)[n % 4]
            for softcap, window in flags:
                sig = {k: v.format(t=dt) for k, v in SIGNATURE_PTRS.items()}
                sig |= {k: "i32" for k in SIGNATURE_INTS}
                sig |= {"scale": "fp32", "softcap": "fp32", "window": "i32"}
                cfg = dict(G=G, BLOCK_R=block_r, BLOCK_D=block_d, D=block_d - 16 * (n % 2), BS=16,
                           SOFTCAP=softcap, WINDOW=window, IEEE=dt == "fp32")
                warps = launch((1,), block_r * block_d).num_warps
                yield "paged_attention", _paged_attention_kernel, sig, cfg, warps
