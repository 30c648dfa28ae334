"""Exact speculative-sampling verification, all rows at once (grid ``[B]``).

For row b with ``n_b`` draft tokens ``d_0 .. d_{n-1}``, target distributions
``p_0 .. p_n`` and draft distributions ``q_0 .. q_{n-1}`` (or point masses on the
drafts when the drafter has none)::

    for j in 0 .. n-1:
        accept d_j  iff  u_j * q_j(d_j) < p_j(d_j)          (u_j ~ U(0, 1))
        on rejection emit  x ~ normalize(max(p_j - q_j, 0))  and stop
    if all accepted: emit the bonus token x ~ p_n

(Leviathan et al. 2023; Chen et al. 2023): the emitted tokens are distributed
exactly as if drawn from the target one by one. ``u_j`` and the draws use the
counter-based hash keyed by (seed, position): the acceptance test reads a lane no
token id uses, the draws are exponential races ``argmax r_i / E_i`` on the token
lanes, so they are independent. Greedy rows pass one-hot ``p``, which makes the rule
"accept while the draft is the argmax". The torch reference is
``decodekit.sampling.reference.verify_reference``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from . import layout
from ._common import ACCEPT_LANE, mix32, race_tile, row_keys
from .launch import launch, next_pow2

__all__ = ["aot_configs", "verify"]


@triton.jit
def _uniform(k1, k2):
    """U(0, 1) with 32 random bits from the acceptance lane of a row's keys."""
    h = mix32((tl.full([], ACCEPT_LANE, tl.uint32) * 0x9E3779B1) ^ k1)
    r = mix32(h + k2)
    return (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10


@triton.jit
def _race(p_row, q_row, skip, V, k1, k2, USE_Q: tl.constexpr, BLOCK: tl.constexpr):
    """argmax_i w_i / E_i over i != skip, with w = max(p - q, 0) (USE_Q) or p."""
    best = -1.0
    best_i = 0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        w = tl.load(p_row + offs, mask=inb, other=0.0)
        if USE_Q:
            w = tl.maximum(w - tl.load(q_row + offs, mask=inb, other=0.0), 0.0)
        best, best_i = race_tile(w, inb & (w > 0) & (offs != skip), offs, start, k1, k2, best, best_i)
    return best_i


@triton.jit
def _verify_kernel(
    p_ptr, q_ptr,                  # [B, K+1, V] f32 target probs, [B, K, V] f32 draft probs
    draft_ptr, n_draft_ptr,        # [B, K] int32 draft tokens, [B] int32 drafts per row
    seed_ptr, pos_ptr,             # [B] int64 seeds, [B] int64 position of the first draft
    out_ptr, n_acc_ptr,            # [B, K+1] int64 emitted tokens (-1 padded), [B] int32 accepted
    V, K,
    HAS_Q: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(n_draft_ptr + row)
    seed = tl.load(seed_ptr + row)
    pos0 = tl.load(pos_ptr + row)
    p_base = p_ptr + row * (K + 1) * V
    q_base = q_ptr + row * K * V
    for j in range(0, K + 1):
        tl.store(out_ptr + row * (K + 1) + j, -1)
    done = 0
    n_acc = 0
    for j in range(0, K):
        if (j < n) & (done == 0):
            k1, k2 = row_keys(seed, pos0 + j)
            d = tl.load(draft_ptr + row * K + j).to(tl.int64)
            pd = tl.load(p_base + j * V + d)
            if HAS_Q:
                qd = tl.load(q_base + j * V + d)
            else:
                qd = 1.0
            if _uniform(k1, k2) * qd < pd:
                tl.store(out_ptr + row * (K + 1) + j, d)
                n_acc += 1
            else:
                if HAS_Q:
                    x = _race(p_base + j * V, q_base + j * V, -1, V, k1, k2, True, BLOCK)
                else:
                    # point mass: max(p - q, 0) is p with the draft token removed
                    x = _race(p_base + j * V, q_base, d, V, k1, k2, False, BLOCK)
                tl.store(out_ptr + row * (K + 1) + j, x)
                done = 1
    if done == 0:
        k1, k2 = row_keys(seed, pos0 + n)
        x = _race(p_base + n * V, q_base, -1, V, k1, k2, False, BLOCK)
        tl.store(out_ptr + row * (K + 1) + n, x)
    tl.store(n_acc_ptr + row, n_acc)


def verify(
    p: torch.Tensor,
    q: torch.Tensor | None,
    draft: torch.Tensor,
    n_draft: torch.Tensor,
    seed: torch.Tensor,
    position: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_verify_kernel`.

    Parameters: ``p [B, K+1, V]`` and ``q [B, K, V]`` (or None: point masses) fp32
    contiguous; ``draft [B, K]``; ``n_draft [B]`` (``<= K``); ``seed [B]``;
    ``position [B]`` (the step counter of each row's first draft).
    Returns ``(tokens int64 [B, K+1] padded with -1, n_accepted int32 [B])``.
    """
    B, K1, V = p.shape
    K = K1 - 1
    if q is not None and q.shape != (B, K, V):
        raise ValueError(f"q must be [{B}, {K}, {V}], got {tuple(q.shape)}")
    if draft.shape != (B, K) or n_draft.shape != (B,):
        raise ValueError("draft must be [B, K] and n_draft [B]")
    for t in (p, q):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError("p and q must be contiguous float32")
    out = torch.empty(B, K + 1, dtype=torch.int64, device=p.device)
    n_acc = torch.empty(B, dtype=torch.int32, device=p.device)
    block = min(layout.BLOCK_VERIFY, next_pow2(V))
    go = launch((B,), block)
    _verify_kernel[go.grid](
        p, q if q is not None else p,
        draft.to(torch.int32).contiguous(), n_draft.to(torch.int32).contiguous(),
        seed.to(torch.int64).contiguous(), position.to(torch.int64).contiguous(),
        out, n_acc, V, K,
        HAS_Q=q is not None, BLOCK=block, num_warps=go.num_warps,
    )
    return out, n_acc


SIGNATURE = {"p_ptr": "*fp32", "q_ptr": "*fp32", "draft_ptr": "*i32", "n_draft_ptr": "*i32",
             "seed_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*i64", "n_acc_ptr": "*i32",
             "V": "i32", "K": "i32"}


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """``(name, kernel, signature, constexprs, num_warps)`` of every launch at full block
    width (smaller vocabularies use a smaller power-of-two block)."""
    for has_q in (False, True):
        yield "verify", _verify_kernel, SIGNATURE, dict(HAS_Q=has_q, BLOCK=layout.BLOCK_VERIFY), \
            launch((1,), layout.BLOCK_VERIFY).num_warps

