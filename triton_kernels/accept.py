"""Commit tokens chosen outside the select kernel (speculative decoding's emitted tokens,
a functional call's output history) to the slots' state: step counter, penalty counts,
bad-word history. Grid ``[B]``, one program per slot, tokens in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch
import triton
import triton.language as tl

from ._common import I_FLAGS, NI, commit_token
from .launch import launch

__all__ = ["accept", "aot_configs"]


@triton.jit
def _accept_kernel(tok_ptr, stride_t, n_tok, slots_ptr, iparams_ptr, counts_ptr, hist_ptr, V, H,
                   HAS_PENALTY: tl.constexpr, HAS_HIST: tl.constexpr):
    """Commit up to ``n_tok`` tokens per row (negative ids are skipped)."""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    for j in range(0, n_tok):
        tok = tl.load(tok_ptr + row * stride_t + j).to(tl.int64)
        if (tok >= 0) & (tok < V):  # out-of-range ids never touch another slot's counts
            commit_token(slot, tok, flags, iparams_ptr, counts_ptr, hist_ptr, V, H,
                         HAS_PENALTY, HAS_HIST)


def accept(
    token_ids: torch.Tensor,
    slots: torch.Tensor,
    iparams: torch.Tensor,
    counts: torch.Tensor | None,
    hist: torch.Tensor | None,
    vocab_size: int,
) -> None:
    """Commit ``token_ids [B, n]`` int32 (negative = none) to distinct slots ``[B]`` int32."""
    B, n = token_ids.shape
    if token_ids.dtype != torch.int32 or token_ids.stride(1) != 1:
        raise ValueError("token_ids must be int32 and contiguous along the token dimension")
    if slots.shape != (B,) or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [{B}], got {slots.dtype} {tuple(slots.shape)}")
    go = launch((B,), 1)  # scalar work: one warp
    _accept_kernel[go.grid](
        token_ids, token_ids.stride(0), n, slots, iparams,
        counts if counts is not None else iparams,
        hist if hist is not None else iparams,
        vocab_size, hist.shape[1] if hist is not None else 1,
        HAS_PENALTY=counts is not None, HAS_HIST=hist is not None, num_warps=go.num_warps,
    )


SIGNATURE = {"tok_ptr": "*i32", "stride_t": "i32", "n_tok": "i32", "slots_ptr": "*i32",
             "iparams_ptr": "*i32", "counts_ptr": "*i32", "hist_ptr": "*i32", "V": "i32", "H": "i32"}


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """``(name, kernel, signature, constexprs, num_warps)`` of every launch: with/without
    each table."""
    for pen, hist in product([False, True], repeat=2):
        yield "accept", _accept_kernel, SIGNATURE, dict(HAS_PENALTY=pen, HAS_HIST=hist), \
            launch((1,), 1).num_warps
