"""Launch 1 of a step: one pass over the logits for bias, masks, penalties and
temperature, writing the processed row (when later passes need it) and per-chunk
statistics: running max, sum of exp, the chunk's winner of the exponential race
(argmax for greedy rows) and the raw log-softmax statistics.

Math (one row, token i, see ``decodekit.sampling.reference.process_logits``)::

    x_i = logits_i + bias_i                     (-inf for banned tokens)
    x_i = x_i / r if x_i > 0 else x_i * r       when i is in the prompt or output
    x_i -= f * count_i + p * [count_i > 0]
    l_i = x_i / T                               (T = 1 for greedy rows)

Grid: (rows, programs per row); each program covers ``chunk`` columns. Row ``r`` reads
the state of slot ``slots[r]`` (vLLM's ``idx_mapping``: several rows may share a slot).

Window rows (``WINDOW``, speculative decoding): row ``r = q * W + j`` is window position
``j`` of request ``q`` and sees that request's state *as if* ``drafts[q, :j]`` had been
accepted: each valid draft adds 2 to its penalty count and 1 to the step counter
(``min_new_tokens``) and extends the bad-word history. The drafts are compared in
registers; the slot's tables are only read.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch
import triton
import triton.language as tl

from . import layout
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
    NPART,
    race_tile,
    row_keys,
)
from .launch import launch, next_pow2

__all__ = ["aot_configs", "process_logits"]


@triton.jit
def _window_drafts(drafts_ptr, row, W, V, KP: tl.constexpr):
    """Drafts counted by window row ``row`` (``drafts[row // W, :row % W]``).

    Returns ``(d [KP], rank [KP], n_prev)``: each draft (-1 when not counted: past the
    row's position, negative or >= V), its offset in the history after the slot's own
    tokens (-1 when not counted), and how many are counted.
    """
    i = tl.arange(0, KP)
    d = tl.load(drafts_ptr + (row // W) * (W - 1) + i, mask=i < row % W, other=-1)
    ok = (d >= 0) & (d < V)
    d = tl.where(ok, d, -1).to(tl.int32)
    rank = tl.sum(tl.where((i[None, :] < i[:, None]) & ok[None, :], 1, 0), axis=1)
    return d, tl.where(ok, rank, -1), tl.sum(ok.to(tl.int32), axis=0)


@triton.jit
def _banned_seq_tokens(badseq_ptr, badlen_ptr, hist_ptr, slot, n_hist, H, d, rank, n_prev,
                       NBP: tl.constexpr, LP: tl.constexpr, WINDOW: tl.constexpr):
    """Last tokens of the slot's multi-token bad words whose prefix just occurred ([NBP], -1
    if not). The history is the slot's ring (``n_hist`` tokens) then the counted drafts."""
    s = tl.arange(0, NBP)
    j = tl.arange(0, LP)
    slen = tl.load(badlen_ptr + slot * NBP + s)
    seq = tl.load(badseq_ptr + slot * NBP * LP + s[:, None] * LP + j[None, :])
    n_all = n_hist + n_prev
    pos = n_all - (slen[:, None] - 1) + j[None, :]
    in_prefix = j[None, :] < (slen[:, None] - 1)
    hmod = tl.where(pos >= 0, pos % H, 0)
    tok = tl.load(hist_ptr + slot * H + hmod, mask=in_prefix & (pos >= 0) & (pos < n_hist),
                  other=-2)
    if WINDOW:  # positions past the ring are drafts: pick the draft of that rank
        k = pos - n_hist
        from_d = tl.sum(tl.where(rank[None, None, :] == k[:, :, None], d[None, None, :], 0), axis=2)
        tok = tl.where(in_prefix & (k >= 0), from_d, tok)
    ok = (~in_prefix) | ((tok == seq) & (pos >= 0))
    match = (tl.sum((~ok).to(tl.int32), axis=1) == 0) & (slen >= 2) & (n_all >= slen - 1)
    last = tl.sum(tl.where(j[None, :] == (slen[:, None] - 1), seq, 0), axis=1)
    return tl.where(match, last, -1)


@triton.jit
def _process_tile(x, offs, inb, slot, V, flags, rep, freq, pres, temp, sup, ban, d,
                  bias_ptr, counts_ptr, mask_row, HAS_BIAS: tl.constexpr, HAS_PENALTY: tl.constexpr,
                  HAS_SUPPRESS: tl.constexpr, HAS_BADSEQ: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_MASK: tl.constexpr):
    """Processed logits of one tile (``-inf`` where banned) and the banned mask.

    ``HAS_MASK``: ``mask_row`` points at the row's allowed-token bitmask (int32 words, bit
    ``i % 32`` of word ``i // 32``); a token outside it is banned, and a token the request's
    own masks ban but the bitmask allows gets ``-FLT_MAX`` instead of ``-inf``: probability
    0 unless every allowed token is banned (then the bitmask wins: uniform over it)."""
    banned = ~inb
    if HAS_BIAS:
        b = tl.load(bias_ptr + slot * V + offs, mask=tl.where((flags & F_BIAS) != 0, inb, False),
                    other=0.0)
        neg = b == -float("inf")
        banned = banned | neg
        x = x + tl.where(neg, 0.0, b)
    if HAS_SUPPRESS:
        banned = banned | (tl.sum((offs[:, None] == sup[None, :]).to(tl.int32), axis=1) > 0)
    if HAS_BADSEQ:
        banned = banned | (tl.sum((offs[:, None] == ban[None, :]).to(tl.int32), axis=1) > 0)
    if HAS_PENALTY:
        row_pen = (flags & F_PENALTY) != 0
        cnt = tl.load(counts_ptr + slot * V + offs, mask=tl.where(row_pen, inb, False), other=0)
        if WINDOW:  # each earlier draft of the window counts as an output token
            hits = tl.sum((offs[:, None] == d[None, :]).to(tl.int32), axis=1)
            cnt = cnt + tl.where(row_pen, 2 * hits, 0)
        out = (cnt >> 1).to(tl.float32)
        x = tl.where(cnt != 0, tl.where(x < 0, x * rep, x / rep), x)
        x = x - out * freq
        x = x - (out > 0).to(tl.float32) * pres
    l = x / temp
    l = tl.where(l != l, -float("inf"), l)
    l = tl.minimum(tl.maximum(l, -FLT_MAX), FLT_MAX)
    if HAS_MASK:
        words = tl.load(mask_row + offs // 32, mask=inb, other=0)
        ok = ((words >> (offs % 32)) & 1) != 0
        l = tl.where(banned & ok, -FLT_MAX, l)
        banned = ~ok
    return tl.where(banned, -float("inf"), l), banned


@triton.jit
def _online_lse(x, m_run, s_run):
    """Running max and sum of ``exp(x - max)`` after one more tile."""
    nm = tl.maximum(m_run, tl.max(x, axis=0))
    safe = tl.where(nm == -float("inf"), 0.0, nm)
    return nm, s_run * tl.exp(m_run - safe) + tl.sum(tl.exp(x - safe), axis=0)


@triton.jit
def _race_tile(l, banned, offs, start, m_run, nm, best, best_i, race, k1, k2):
    """Update the chunk's winner: the exponential race ``exp(l - m) / E`` (keys rescaled
    as the running max ``m_run -> nm`` grows), or the argmax for greedy/filtered rows."""
    safe = tl.where(nm == -float("inf"), 0.0, nm)
    if race:
        best = tl.where(best > 0, best * tl.exp(m_run - safe), best)
        best, best_i = race_tile(tl.exp(l - safe), ~banned, offs, start, k1, k2, best, best_i)
    else:
        kb = tl.max(l, axis=0)
        take = kb > best
        best_i = tl.where(take, start + tl.argmax(l, axis=0), best_i)
        best = tl.where(take, kb, best)
    return best, best_i


@triton.jit
def _process_kernel(
    logits_ptr, stride_l,                # [N, V] fp32/fp16/bf16, row stride
    slots_ptr,                           # [N] int32: the slot of each row
    fparams_ptr, iparams_ptr, seed_ptr,  # [S, NF] f32, [S, NI] i32, [S] i64
    bias_ptr, counts_ptr,                # [S, V] f32, [S, V] i32
    suppress_ptr,                        # [S, NSP] i32 (-1 padded)
    badseq_ptr, badlen_ptr, hist_ptr,    # [S, NBP, LP] i32, [S, NBP] i32, [S, H] i32
    drafts_ptr,                          # [N / W, W - 1] i64 (WINDOW)
    work_ptr,                            # [N, V] f32 processed logits (if WRITE_WORK)
    part_f_ptr, part_i_ptr,              # flat [N * C * NPART] f32, [N * C] i32
    mask_ptr,                            # [N, MW] i32 allowed-token bitmask (HAS_MASK)
    V, chunk, H, W, MW,
    HAS_BIAS: tl.constexpr, HAS_PENALTY: tl.constexpr, HAS_SUPPRESS: tl.constexpr,
    HAS_BADSEQ: tl.constexpr, WRITE_WORK: tl.constexpr, NEED_RAW: tl.constexpr,
    WINDOW: tl.constexpr, NSP: tl.constexpr, NBP: tl.constexpr, LP: tl.constexpr,
    KP: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride can pass 2**31
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    greedy = (flags & F_GREEDY) != 0
    race = ((flags & F_FILTER) == 0) & (~greedy)
    temp = tl.where(greedy, 1.0, tl.load(fparams_ptr + slot * NF + F_TEMP))
    rep = tl.load(fparams_ptr + slot * NF + F_REP)
    freq = tl.load(fparams_ptr + slot * NF + F_FREQ)
    pres = tl.load(fparams_ptr + slot * NF + F_PRES)
    d = tl.full([KP], -1, tl.int32)
    rank = tl.full([KP], -1, tl.int32)
    n_prev = 0
    if WINDOW:
        d, rank, n_prev = _window_drafts(drafts_ptr, row, W, V, KP)
    n_gen = tl.load(iparams_ptr + slot * NI + I_NGEN) + n_prev
    k1, k2 = row_keys(tl.load(seed_ptr + slot), n_gen)
    sup = tl.full([NSP], -1, tl.int32)
    if HAS_SUPPRESS:
        active = ((flags & F_SUPPRESS) != 0) & (n_gen < tl.load(iparams_ptr + slot * NI + I_MINNEW))
        ns = tl.arange(0, NSP)
        sup = tl.load(suppress_ptr + slot * NSP + ns, mask=tl.where(active, ns >= 0, False), other=-1)
    ban = tl.full([NBP], -1, tl.int32)
    if HAS_BADSEQ:
        if (flags & F_BADSEQ) != 0:
            n_hist = tl.load(iparams_ptr + slot * NI + I_NHIST)
            ban = _banned_seq_tokens(badseq_ptr, badlen_ptr, hist_ptr, slot, n_hist, H, d, rank,
                                     n_prev, NBP, LP, WINDOW)

    m_run = tl.full([], -float("inf"), tl.float32)
    s_run = tl.full([], 0.0, tl.float32)
    best = tl.full([], -float("inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    raw_m = tl.full([], -float("inf"), tl.float32)
    raw_s = tl.full([], 0.0, tl.float32)
    l_min = tl.full([], float("inf"), tl.float32)
    start0 = c * chunk
    end = tl.minimum(start0 + chunk, V)
    for start in range(start0, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < end
        x = tl.load(logits_ptr + row * stride_l + offs, mask=inb, other=-float("inf")).to(tl.float32)
        x = tl.where(x != x, -float("inf"), x)
        if NEED_RAW:
            raw_m, raw_s = _online_lse(x, raw_m, raw_s)
        l, banned = _process_tile(x, offs, inb, slot, V, flags, rep, freq, pres, temp, sup, ban, d,
                                  bias_ptr, counts_ptr, mask_ptr + row * MW, HAS_BIAS, HAS_PENALTY,
                                  HAS_SUPPRESS, HAS_BADSEQ, WINDOW, HAS_MASK)
        if WRITE_WORK:
            tl.store(work_ptr + row * V + offs, l, mask=inb)
        nm, s_run = _online_lse(l, m_run, s_run)
        l_min = tl.minimum(l_min, tl.min(tl.where(l > -float("inf"), l, float("inf")), axis=0))
        best, best_i = _race_tile(l, banned, offs, start, m_run, nm, best, best_i, race, k1, k2)
        m_run = nm

    pf = part_f_ptr + (row * n_chunks + c) * NPART
    tl.store(pf + 0, m_run)
    tl.store(pf + 1, s_run)
    tl.store(pf + 2, best)
    tl.store(pf + 3, raw_m)
    tl.store(pf + 4, raw_s)
    tl.store(pf + 5, l_min)
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
    drafts: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Launch :func:`_process_kernel` over ``logits [N, V]`` for the slot of each row ``slots [N]``.

    Optional state tensors that are ``None`` turn their feature off at compile time.
    ``mask [N, ceil(V / 32)]`` int32: each row's allowed tokens (guided decoding).
    ``part_f [N, chunks, NPART]`` / ``part_i [N, chunks]`` receive the per-chunk statistics.
    ``drafts [R, W - 1]`` int64 (window rows, ``N = R * W``): row ``q * W + j`` counts
    ``drafts[q, :j]`` as accepted (-1 entries are skipped).
    """
    N, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary dimension")
    if slots.shape != (N,) or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [{N}], got {slots.dtype} {tuple(slots.shape)}")
    if part_f.numel() < N * chunks * layout.NPART or part_i.numel() < N * chunks:
        raise ValueError("partials buffer too small for this launch")
    W = 1
    if drafts is not None:
        W = drafts.shape[1] + 1
        if drafts.dtype != torch.int64 or not drafts.is_contiguous() or drafts.shape[0] * W != N:
            raise ValueError(f"drafts must be contiguous int64 [N / W, W - 1], got {drafts.dtype} "
                             f"{tuple(drafts.shape)} for {N} rows")
    MW = -(-V // 32)
    if mask is not None and (mask.dtype != torch.int32 or mask.shape != (N, MW) or not mask.is_contiguous()):
        raise ValueError(f"mask must be contiguous int32 [{N}, {MW}], got {mask.dtype} {tuple(mask.shape)}")
    dummy_i, dummy_f = iparams, fparams
    go = launch((N, chunks), layout.BLOCK_PROCESS)
    _process_kernel[go.grid](
        logits, logits.stride(0), slots, fparams, iparams, seed,
        bias if bias is not None else dummy_f,
        counts if counts is not None else dummy_i,
        suppress if suppress is not None else dummy_i,
        badseq if badseq is not None else dummy_i,
        badlen if badlen is not None else dummy_i,
        hist if hist is not None else dummy_i,
        drafts if drafts is not None else dummy_i,
        work if work is not None else dummy_f,
        part_f, part_i, mask if mask is not None else dummy_i,
        V, chunk, hist.shape[1] if hist is not None else 1, W, MW,
        HAS_BIAS=bias is not None, HAS_PENALTY=counts is not None,
        HAS_SUPPRESS=suppress is not None, HAS_BADSEQ=badseq is not None,
        WRITE_WORK=work is not None, NEED_RAW=need_raw, WINDOW=drafts is not None,
        NSP=suppress.shape[1] if suppress is not None else 1,
        NBP=badseq.shape[1] if badseq is not None else 1,
        LP=badseq.shape[2] if badseq is not None else 1,
        KP=next_pow2(W - 1), BLOCK=layout.BLOCK_PROCESS, HAS_MASK=mask is not None,
        num_warps=go.num_warps,
    )


# --------------------------------------------------------------------------- AOT configurations
SIGNATURE = {
    "logits_ptr": "*fp32", "stride_l": "i32", "slots_ptr": "*i32", "fparams_ptr": "*fp32",
    "iparams_ptr": "*i32", "seed_ptr": "*i64", "bias_ptr": "*fp32", "counts_ptr": "*i32",
    "suppress_ptr": "*i32", "badseq_ptr": "*i32", "badlen_ptr": "*i32", "hist_ptr": "*i32",
    "drafts_ptr": "*i64", "work_ptr": "*fp32", "part_f_ptr": "*fp32", "part_i_ptr": "*i32",
    "mask_ptr": "*i32", "V": "i32", "chunk": "i32", "H": "i32", "W": "i32", "MW": "i32",
}


WARPS = launch((1,), layout.BLOCK_PROCESS).num_warps


def _config(bias, pen, sup, bad, work, raw, window, kp=4, mask=False) -> dict[str, object]:
    return dict(HAS_BIAS=bias, HAS_PENALTY=pen, HAS_SUPPRESS=sup, HAS_BADSEQ=bad,
                WRITE_WORK=work, NEED_RAW=raw, WINDOW=window, NSP=8 if sup else 1,
                NBP=4 if bad else 1, LP=4 if bad else 1, KP=kp if window else 1,
                BLOCK=layout.BLOCK_PROCESS, HAS_MASK=mask)


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every configuration the sampler launches: ``(name, kernel, signature, constexprs,
    num_warps)``.

    Step launches: every feature combination with fp32 logits, and fp16/bf16 logits on
    the plain paths (the dtype only changes the first load). Window launches (probs:
    work written, no raw statistics): every feature combination, 4 and 64 drafts.
    """
    for feats in product([False, True], repeat=6):
        for ldt in ("*fp32", "*fp16", "*bf16"):
            if ldt != "*fp32" and any(feats[:4]):
                continue
            yield "process", _process_kernel, SIGNATURE | {"logits_ptr": ldt}, \
                _config(*feats, False), WARPS
    for feats in product([False, True], repeat=4):
        for ldt in ("*fp32", "*bf16"):
            if ldt != "*fp32" and any(feats):
                continue
            yield "process_window", _process_kernel, SIGNATURE | {"logits_ptr": ldt}, \
                _config(*feats, True, False, True), WARPS
    yield "process_window", _process_kernel, SIGNATURE, \
        _config(True, True, True, True, True, False, True, kp=64), WARPS
    # guided decoding (the bitmask only meets the other features in `banned` and `l`): every
    # (work, raw) pair with no other feature and with all of them; bf16 plain
    masks = [(False,) * 4, (True,) * 4]
    for feats in masks:
        for work, raw in product([False, True], repeat=2):
            yield "process_mask", _process_kernel, SIGNATURE, \
                _config(*feats, work, raw, False, mask=True), WARPS
    for work, raw, ldt in product([False, True], [False, True], ("*fp16", "*bf16")):
        yield "process_mask", _process_kernel, SIGNATURE | {"logits_ptr": ldt}, \
            _config(False, False, False, False, work, raw, False, mask=True), WARPS
    for feats in ((False,) * 4, (True,) * 4):
        yield "process_mask_window", _process_kernel, SIGNATURE, \
            _config(*feats, True, False, True, mask=True), WARPS
