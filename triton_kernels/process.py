"""Launch 1 of a step: one pass over the logits for bias, masks, penalties and
temperature, writing the processed row (when later passes need it) and per-chunk
statistics: running max, sum of exp, the chunk's winner of the exponential race
(argmax for greedy rows) and the raw log-softmax statistics.

Math (one row, token i, see decodekit.reference.process_logits)::

    x_i = logits_i + bias_i                     (-inf for banned tokens)
    x_i = x_i / r if x_i > 0 else x_i * r       when i is in the prompt or output
    x_i -= f * count_i + p * [count_i > 0]
    l_i = x_i / T                               (T = 1 for greedy rows)

Grid: (B, programs per row); each program covers ``chunk`` columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    F_BADSEQ,
    F_BIAS,
    F_FILTER,
    F_FREQ,
    F_GREEDY,
    F_PENALTY,
    F_PRES,
    F_REP,
    F_SUPPRESS,
    F_TEMP,
    FLT_MAX,
    I_FLAGS,
    I_MINNEW,
    I_NGEN,
    I_NHIST,
    NF,
    NI,
    exponential,
    row_keys,
)

NPART = 6  # per-chunk floats: max, sumexp, race key, raw max, raw sumexp, -


@triton.jit
def _banned_seq_tokens(badseq_ptr, badlen_ptr, hist_ptr, slot, n_hist, H,
                       NBP: tl.constexpr, LP: tl.constexpr):
    """Last tokens of the slot's multi-token bad words whose prefix just occurred ([NBP], -1 if not)."""
    s = tl.arange(0, NBP)
    j = tl.arange(0, LP)
    slen = tl.load(badlen_ptr + slot * NBP + s)
    seq = tl.load(badseq_ptr + slot * NBP * LP + s[:, None] * LP + j[None, :])
    pos = n_hist - (slen[:, None] - 1) + j[None, :]
    in_prefix = j[None, :] < (slen[:, None] - 1)
    hmod = tl.where(pos >= 0, pos % H, 0)
    tok = tl.load(hist_ptr + slot * H + hmod, mask=in_prefix & (pos >= 0), other=-2)
    ok = (~in_prefix) | ((tok == seq) & (pos >= 0))
    match = (tl.sum((~ok).to(tl.int32), axis=1) == 0) & (slen >= 2) & (n_hist >= slen - 1)
    last = tl.sum(tl.where(j[None, :] == (slen[:, None] - 1), seq, 0), axis=1)
    return tl.where(match, last, -1)


@triton.jit
def _process_kernel(
    logits_ptr, stride_l,                # [B, V] fp32/fp16/bf16, row stride
    slots_ptr,                           # [B] int32
    fparams_ptr, iparams_ptr, seed_ptr,  # [S, NF] f32, [S, NI] i32, [S] i64
    bias_ptr, counts_ptr,                # [S, V] f32, [S, V] i32
    suppress_ptr,                        # [S, NSP] i32 (-1 padded)
    badseq_ptr, badlen_ptr, hist_ptr,    # [S, NBP, LP] i32, [S, NBP] i32, [S, H] i32
    work_ptr,                            # [B, V] f32 processed logits (if WRITE_WORK)
    part_f_ptr, part_i_ptr,              # flat [B * C * 6] f32, [B * C] i32
    V, chunk, H,
    HAS_BIAS: tl.constexpr, HAS_PENALTY: tl.constexpr, HAS_SUPPRESS: tl.constexpr,
    HAS_BADSEQ: tl.constexpr, WRITE_WORK: tl.constexpr, NEED_RAW: tl.constexpr,
    NSP: tl.constexpr, NBP: tl.constexpr, LP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    greedy = (flags & F_GREEDY) != 0
    race = ((flags & F_FILTER) == 0) & (~greedy)
    temp = tl.load(fparams_ptr + slot * NF + F_TEMP)
    temp = tl.where(greedy, 1.0, temp)
    n_gen = tl.load(iparams_ptr + slot * NI + I_NGEN)
    k1, k2 = row_keys(tl.load(seed_ptr + slot), n_gen)
    row_bias = (flags & F_BIAS) != 0
    row_pen = (flags & F_PENALTY) != 0
    rep = tl.load(fparams_ptr + slot * NF + F_REP)
    freq = tl.load(fparams_ptr + slot * NF + F_FREQ)
    pres = tl.load(fparams_ptr + slot * NF + F_PRES)
    if HAS_SUPPRESS:
        active = ((flags & F_SUPPRESS) != 0) & (n_gen < tl.load(iparams_ptr + slot * NI + I_MINNEW))
        ns = tl.arange(0, NSP)
        sup = tl.load(suppress_ptr + slot * NSP + ns, mask=tl.where(active, ns >= 0, False), other=-1)
    if HAS_BADSEQ:
        if (flags & F_BADSEQ) != 0:
            n_hist = tl.load(iparams_ptr + slot * NI + I_NHIST)
            ban = _banned_seq_tokens(badseq_ptr, badlen_ptr, hist_ptr, slot, n_hist, H, NBP, LP)
        else:
            ban = tl.full([NBP], -1, tl.int32)

    m_run = -float("inf")
    s_run = 0.0
    best = -float("inf")
    best_i = 0
    raw_m = -float("inf")
    raw_s = 0.0
    start0 = c * chunk
    end = tl.minimum(start0 + chunk, V)
    for start in range(start0, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < end
        x = tl.load(logits_ptr + row * stride_l + offs, mask=inb, other=-float("inf")).to(tl.float32)
        x = tl.where(x != x, -float("inf"), x)
        if NEED_RAW:
            bm = tl.max(x, axis=0)
            nm = tl.maximum(raw_m, bm)
            safe = tl.where(nm == -float("inf"), 0.0, nm)
            raw_s = raw_s * tl.exp(raw_m - safe) + tl.sum(tl.exp(x - safe), axis=0)
            raw_m = nm
        banned = ~inb
        if HAS_BIAS:
            b = tl.load(bias_ptr + slot * V + offs, mask=tl.where(row_bias, inb, False), other=0.0)
            neg = b == -float("inf")
            banned = banned | neg
            x = x + tl.where(neg, 0.0, b)
        if HAS_SUPPRESS:
            banned = banned | (tl.sum((offs[:, None] == sup[None, :]).to(tl.int32), axis=1) > 0)
        if HAS_BADSEQ:
            banned = banned | (tl.sum((offs[:, None] == ban[None, :]).to(tl.int32), axis=1) > 0)
        if HAS_PENALTY:
            cnt = tl.load(counts_ptr + slot * V + offs, mask=tl.where(row_pen, inb, False), other=0)
            out = (cnt >> 1).to(tl.float32)
            x = tl.where(cnt != 0, tl.where(x < 0, x * rep, x / rep), x)
            x = x - out * freq
            x = x - (out > 0).to(tl.float32) * pres
        l = x / temp
        l = tl.where(l != l, -float("inf"), l)
        l = tl.minimum(tl.maximum(l, -FLT_MAX), FLT_MAX)
        l = tl.where(banned, -float("inf"), l)
        if WRITE_WORK:
            tl.store(work_ptr + row * V + offs, l, mask=inb)
        bm = tl.max(l, axis=0)
        nm = tl.maximum(m_run, bm)
        safe = tl.where(nm == -float("inf"), 0.0, nm)
        s_run = s_run * tl.exp(m_run - safe) + tl.sum(tl.exp(l - safe), axis=0)
        if race:
            best = tl.where(best > 0, best * tl.exp(m_run - safe), best)
            key = tl.exp(l - safe) / exponential(offs, k1, k2)
            key = tl.where(banned, -1.0, key)
        else:
            key = l
        m_run = nm
        kb = tl.max(key, axis=0)
        ki = tl.argmax(key, axis=0)
        take = kb > best
        best_i = tl.where(take, start + ki, best_i)
        best = tl.where(take, kb, best)

    pf = part_f_ptr + (row * n_chunks + c) * 6
    tl.store(pf + 0, m_run)
    tl.store(pf + 1, s_run)
    tl.store(pf + 2, best)
    tl.store(pf + 3, raw_m)
    tl.store(pf + 4, raw_s)
    tl.store(part_i_ptr + row * n_chunks + c, best_i)


def process_logits(
    logits: torch.Tensor,
    slots: torch.Tensor,
    fparams: torch.Tensor,
    iparams: torch.Tensor,
    seed: torch.Tensor,
    bias: torch.Tensor | None,
    counts: torch.Tensor | None,
    suppress: torch.Tensor | None,
    badseq: torch.Tensor | None,
    badlen: torch.Tensor | None,
    hist: torch.Tensor | None,
    work: torch.Tensor | None,
    part_f: torch.Tensor,
    part_i: torch.Tensor,
    *,
    chunks: int,
    chunk: int,
    need_raw: bool,
    block: int,
) -> None:
    """Launch :func:`_process_kernel` over ``logits [B, V]`` for slot rows ``slots [B]``.

    Optional state tensors that are ``None`` turn their feature off at compile time.
    ``part_f [B, chunks, 6]`` / ``part_i [B, chunks]`` receive the per-chunk statistics.
    """
    B, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary dimension")
    if slots.shape != (B,) or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [{B}], got {slots.dtype} {tuple(slots.shape)}")
    if part_f.numel() < B * chunks * NPART or part_i.numel() < B * chunks:
        raise ValueError("partials buffer too small for this launch")
    dummy_i = iparams
    dummy_f = fparams
    nsp = suppress.shape[1] if suppress is not None else 1
    nbp = badseq.shape[1] if badseq is not None else 1
    lp = badseq.shape[2] if badseq is not None else 1
    H = hist.shape[1] if hist is not None else 1
    _process_kernel[(B, chunks)](
        logits, logits.stride(0), slots, fparams, iparams, seed,
        bias if bias is not None else dummy_f,
        counts if counts is not None else dummy_i,
        suppress if suppress is not None else dummy_i,
        badseq if badseq is not None else dummy_i,
        badlen if badlen is not None else dummy_i,
        hist if hist is not None else dummy_i,
        work if work is not None else dummy_f,
        part_f, part_i,
        V, chunk, H,
        HAS_BIAS=bias is not None, HAS_PENALTY=counts is not None,
        HAS_SUPPRESS=suppress is not None, HAS_BADSEQ=badseq is not None,
        WRITE_WORK=work is not None, NEED_RAW=need_raw,
        NSP=nsp, NBP=nbp, LP=lp, BLOCK=block,
    )
