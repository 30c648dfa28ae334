"""Launch 2 of a step: one program per row combines the per-chunk statistics of
launch 1, finds the filtering thresholds of rows that filter, draws the token,
and commits it to the row's state; or, in probs mode, writes the processed
distribution.

Thresholds are found without sorting. Every filter keeps an interval of the
processed logits ``l`` (top-k, top-p and min-p a top interval, typical-p an
interval around ``c = m + log Z - H``), so each threshold is the largest
integer key ``u`` (fp32 bits in monotone order) with a monotone predicate
``pred(u)`` on the count and mass of the tokens whose key is ``>= u``:

* top-k:   ``count(key >= u) >= k``                     -> k-th largest value
* top-p:   ``mass(key >= u) >= top_p * Z_k``            -> smallest kept value
* typical: ``mass(dkey >= u) > Z_K (1 - typical_p)``    -> largest kept distance

(transformers' warpers, written as thresholds; see
``decodekit.sampling.reference.filter_keep``). Each pass over the row tests ``NP``
pivots at once, shrinking the bracket ``NP + 1``-fold, so 32-bit keys converge in about
``32 / log2(NP + 1)`` passes over an L2-resident row. The draw is the exponential race
``argmax e_i / E_i`` over the kept tokens with the same noise as launch 1.

Rows that filter by top-k, top-p or typical-p normally arrive resolved by the banded
launches (:mod:`decodekit.kernels.bands`: three passes in all); the pivot search here is
their fallback and the path of min-p-only rows (one race pass).

Rows map to slots through ``slots`` (several rows may share a slot when nothing is
committed: the window rows of speculative decoding).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import product

import torch
import triton
import triton.language as tl

from . import layout
from ._common import (
    F_FILTER,
    F_GREEDY,
    F_MINP,
    F_TOPP,
    F_TYP,
    I_FLAGS,
    I_NGEN,
    I_TOPK,
    KEY_NEG_INF,
    KEY_POS_INF,
    MAX_CHUNKS,
    NF,
    NI,
    NPART,
    commit_token,
    float_key,
    race_tile,
    row_keys,
)
from .launch import launch

__all__ = ["aot_configs", "select"]



@triton.jit
def _stats_ge(work_row, V, piv, m, floor_key, min_e, c, dmode: tl.constexpr,
              BLOCK: tl.constexpr, NP: tl.constexpr):
    """Count and mass (sum of exp(l - m)) of eligible tokens whose key is >= each pivot.

    Eligible: ``key(l) >= floor_key`` and ``exp(l - m) >= min_e``. With ``dmode`` the key
    is that of ``|l - c|`` instead of ``l``.
    """
    cnt = tl.zeros([NP], dtype=tl.int32)
    mass = tl.zeros([NP], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(work_row + offs, mask=inb, other=-float("inf"))
        e = tl.exp(l - m)
        k = float_key(l).to(tl.int64)
        ok = inb & (k >= floor_key) & (e >= min_e)
        if dmode:
            k = float_key(tl.abs(l - c)).to(tl.int64)
        ge = ok[:, None] & (k[:, None] >= piv[None, :])
        cnt += tl.sum(ge.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
    return cnt, mass


@triton.jit
def _search(work_row, V, lo, hi, m, floor_key, min_e, c, dmode: tl.constexpr, kk, thr,
            strict: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    """Largest key ``u`` in ``[lo, hi)`` with ``count(>= u) >= kk`` and ``mass(>= u) >=/> thr``.

    ``pred(lo)`` must hold and ``pred(hi)`` must not; the predicate is monotone.
    """
    j = tl.arange(0, NP).to(tl.int64)
    n_pass = 0
    while hi - lo > 1:
        n_pass += 1
        piv = lo + ((hi - lo) * (j + 1)) // (NP + 1)
        cnt, mass = _stats_ge(work_row, V, piv, m, floor_key, min_e, c, dmode, BLOCK, NP)
        if strict:
            pred = (cnt >= kk) & (mass > thr)
        else:
            pred = (cnt >= kk) & (mass >= thr)
        lo = tl.maximum(lo, tl.max(tl.where(pred, piv, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(pred, hi, piv), axis=0))
    return lo, n_pass


@triton.jit
def _combine_chunks(part_f_ptr, part_i_ptr, row, n_chunks, greedy):
    """Launch 1's chunks of one row -> (max ``m``, sum of ``exp(l - m)``, race winner or
    argmax)."""
    cidx = tl.arange(0, MAX_CHUNKS)
    cm = cidx < n_chunks
    pf = part_f_ptr + (row * n_chunks + cidx) * NPART
    m_c = tl.load(pf + 0, mask=cm, other=-float("inf"))
    s_c = tl.load(pf + 1, mask=cm, other=0.0)
    b_c = tl.load(pf + 2, mask=cm, other=-float("inf"))
    i_c = tl.load(part_i_ptr + row * n_chunks + cidx, mask=cm, other=0)
    m = tl.max(m_c, axis=0)
    scale = tl.exp(m_c - m)
    s = tl.sum(tl.where(cm, s_c * scale, 0.0), axis=0)
    if not greedy:  # race keys were relative to each chunk's max
        b_c = tl.where(b_c > 0, b_c * scale, b_c)
    tok = tl.sum(tl.where(cidx == tl.argmax(b_c, axis=0), i_c, 0), axis=0).to(tl.int64)
    return m, s, tok


@triton.jit
def _raw_logprob(logits_ptr, stride_l, part_f_ptr, row, n_chunks, tok):
    """Log-softmax of the raw logits at ``tok`` (NaN counts as -inf) from launch 1's stats."""
    cidx = tl.arange(0, MAX_CHUNKS)
    cm = cidx < n_chunks
    pf = part_f_ptr + (row * n_chunks + cidx) * NPART
    x = tl.load(logits_ptr + row * stride_l + tok).to(tl.float32)
    x = tl.where(x != x, -float("inf"), x)
    raw_m_c = tl.load(pf + 3, mask=cm, other=-float("inf"))
    raw_s_c = tl.load(pf + 4, mask=cm, other=0.0)
    raw_m = tl.max(raw_m_c, axis=0)
    safe = tl.where(raw_m == -float("inf"), 0.0, raw_m)
    raw_s = tl.sum(tl.where(cm, raw_s_c * tl.exp(raw_m_c - safe), 0.0), axis=0)
    return x - safe - tl.log(raw_s)


@triton.jit
def _kept(l, inb, m, tkey, min_e, c, dkey):
    """Kept mask of a tile and ``exp(l - m)``: the three thresholds of the filters."""
    e = tl.exp(l - m)
    kept = inb & (float_key(l).to(tl.int64) >= tkey) & (e >= min_e)
    return kept & (float_key(tl.abs(l - c)).to(tl.int64) <= dkey), e


@triton.jit
def _typical_threshold(work_row, V, m, tkey, min_e, typ, BLOCK: tl.constexpr, NP: tl.constexpr):
    """Typical-p over the tokens top-k/top-p/min-p kept: the centre ``c = m + log Z - H``
    and the largest kept distance key."""
    zsum = 0.0
    s1 = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        l = tl.load(work_row + offs, mask=offs < V, other=-float("inf"))
        e = tl.exp(l - m)
        ok = (float_key(l).to(tl.int64) >= tkey) & (e >= min_e) & (offs < V)
        zsum += tl.sum(tl.where(ok, e, 0.0), axis=0)
        # e > 0: masked tokens (l = -inf) would give 0 * -inf = NaN
        s1 += tl.sum(tl.where(ok & (e > 0), e * (l - m), 0.0), axis=0)
    ent = tl.log(zsum) - s1 / zsum
    c = m + tl.log(zsum) - ent
    dkey, n_pass = _search(work_row, V, tl.full([], -1, tl.int64), tl.full([], KEY_POS_INF + 1, tl.int64),
                           m, tkey, min_e, c, True, 0, zsum * (1.0 - typ), True, BLOCK, NP)
    n_pass += 1
    if dkey < 0:
        n_pass += 1  # 1 - typical_p rounded to 1: keep the closest token, like HF
        dmin = tl.full([], KEY_POS_INF, tl.int64)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            l = tl.load(work_row + offs, mask=offs < V, other=-float("inf"))
            ok = (float_key(l).to(tl.int64) >= tkey) & (tl.exp(l - m) >= min_e)
            dk = float_key(tl.abs(l - c)).to(tl.int64)
            dmin = tl.minimum(dmin, tl.min(tl.where(ok, dk, KEY_POS_INF), axis=0))
        dkey = dmin
    return c, dkey, n_pass


@triton.jit
def _thresholds(work_row, V, m, slot, fparams_ptr, iparams_ptr,
                BLOCK: tl.constexpr, NP: tl.constexpr):
    """The slot's filters as thresholds: ``(tkey, min_e, c, dkey)`` (see the module doc)."""
    top_k = tl.load(iparams_ptr + slot * NI + I_TOPK)
    top_p = tl.load(fparams_ptr + slot * NF + F_TOPP)
    min_e = tl.load(fparams_ptr + slot * NF + F_MINP)
    typ = tl.load(fparams_ptr + slot * NF + F_TYP)
    tkey = tl.full([], KEY_NEG_INF, tl.int64)
    hi0 = float_key(m).to(tl.int64) + 1
    n_pass = 0
    if top_k > 0:
        tkey, n = _search(work_row, V, tkey, hi0, m, tkey, 0.0, 0.0, False,
                          tl.minimum(top_k, V), -1.0, False, BLOCK, NP)
        n_pass += n
    if top_p < 1.0:
        one = tl.full([1], 0, tl.int64) + tkey
        _, zk1 = _stats_ge(work_row, V, one, m, tkey, 0.0, 0.0, False, BLOCK, 1)
        tkey, n = _search(work_row, V, tkey, hi0, m, tkey, 0.0, 0.0, False,
                          0, top_p * tl.sum(zk1, axis=0), False, BLOCK, NP)
        n_pass += n + 1
    c = tl.full([], 0.0, tl.float32)
    dkey = tl.full([], KEY_POS_INF, tl.int64)
    if typ < 1.0:
        c, dkey, n = _typical_threshold(work_row, V, m, tkey, min_e, typ, BLOCK, NP)
        n_pass += n
    return tkey, min_e, c, dkey, n_pass


@triton.jit
def _race_kept(work_row, V, m, tkey, min_e, c, dkey, k1, k2, LOGPROB: tl.constexpr,
               PROBS: tl.constexpr, BLOCK: tl.constexpr):
    """Final pass over a filtered row: the exponential race over the kept tokens (unless
    ``PROBS``) and their mass ``Z``; processed logprobs mask the row of ``work``."""
    best = -1.0
    best_i = 0
    zk = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(work_row + offs, mask=inb, other=-float("inf"))
        kept, e = _kept(l, inb, m, tkey, min_e, c, dkey)
        zk += tl.sum(tl.where(kept, e, 0.0), axis=0)
        if LOGPROB == 2:  # processed logprobs: the alternatives come from this row of `work`
            tl.store(work_row + offs, tl.where(kept, l, -float("inf")), mask=inb)
        if not PROBS:
            best, best_i = race_tile(e, kept, offs, start, k1, k2, best, best_i)
    return best_i.to(tl.int64), zk


@triton.jit
def _write_probs(work_row, probs_row, V, m, zk, tkey, min_e, c, dkey, greedy, tok,
                 BLOCK: tl.constexpr):
    """The processed distribution of one row (one-hot at ``tok`` for greedy rows)."""
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inb = offs < V
        l = tl.load(work_row + offs, mask=inb, other=-float("inf"))
        kept, e = _kept(l, inb, m, tkey, min_e, c, dkey)
        p = tl.where(kept, e / zk, 0.0)
        p = tl.where(greedy, tl.where(offs == tok, 1.0, 0.0), p)
        tl.store(probs_row + offs, p, mask=inb)


@triton.jit
def _select_kernel(
    logits_ptr, stride_l,                # [N, V] raw logits (for raw logprobs)
    slots_ptr,                           # [N] int32: the slot of each row
    fparams_ptr, iparams_ptr, seed_ptr,  # [S, NF] f32, [S, NI] i32, [S] i64
    counts_ptr, hist_ptr,                # [S, V] i32, [S, H] i32
    work_ptr,                            # [N, V] f32 processed logits
    part_f_ptr, part_i_ptr,              # [N, C, NPART] f32, [N, C] i32
    fin_i_ptr, fin_f_ptr,                # [N, 4] i32, [N, 4] f32: banded results (BANDS)
    out_tok_ptr, out_lp_ptr,             # [N] int64, [N] f32
    probs_ptr,                           # [N, V] f32 (PROBS mode)
    passes_ptr,                          # [N] i32: passes over each row (COUNT)
    V, n_chunks, H,
    HAS_FILTER: tl.constexpr, HAS_PENALTY: tl.constexpr, HAS_HIST: tl.constexpr,
    LOGPROB: tl.constexpr, PROBS: tl.constexpr, COMMIT: tl.constexpr, BANDS: tl.constexpr,
    COUNT: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * V can pass 2**31
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    greedy = (flags & F_GREEDY) != 0
    m, zk, tok = _combine_chunks(part_f_ptr, part_i_ptr, row, n_chunks, greedy)
    work_row = work_ptr + row * V
    tkey = tl.full([], KEY_NEG_INF, tl.int64)
    dkey = tl.full([], KEY_POS_INF, tl.int64)
    min_e = tl.full([], 0.0, tl.float32)
    c = tl.full([], 0.0, tl.float32)
    n_pass = 0
    if HAS_FILTER:
        if ((flags & F_FILTER) != 0) & (~greedy):
            status = 0
            if BANDS:
                status = tl.load(fin_i_ptr + row * 4)
            if status == 1:  # thresholds and token from the banded launches
                tok = tl.load(fin_i_ptr + row * 4 + 1).to(tl.int64)
                tkey = tl.load(fin_i_ptr + row * 4 + 2).to(tl.int64)
                dkey = tl.load(fin_i_ptr + row * 4 + 3).to(tl.int64)
                zk = tl.load(fin_f_ptr + row * 4)
                c = tl.load(fin_f_ptr + row * 4 + 1)
                min_e = tl.load(fparams_ptr + slot * NF + F_MINP)
                if LOGPROB == 2:  # mask `work` for the alternatives (one more pass)
                    _race_kept(work_row, V, m, tkey, min_e, c, dkey, 0, 0, LOGPROB, True, BLOCK)
                    n_pass += 1
            else:  # pivot search (no bands for this row, or their verification failed)
                tkey, min_e, c, dkey, n = _thresholds(work_row, V, m, slot, fparams_ptr, iparams_ptr,
                                                      BLOCK, NP)
                k1, k2 = row_keys(tl.load(seed_ptr + slot), tl.load(iparams_ptr + slot * NI + I_NGEN))
                tok, zk = _race_kept(work_row, V, m, tkey, min_e, c, dkey, k1, k2, LOGPROB, PROBS, BLOCK)
                n_pass += n + 1
    if PROBS:
        _write_probs(work_row, probs_ptr + row * V, V, m, zk, tkey, min_e, c, dkey, greedy, tok, BLOCK)
        n_pass += 1
    else:
        tl.store(out_tok_ptr + row, tok)
        if LOGPROB == 1:
            tl.store(out_lp_ptr + row, _raw_logprob(logits_ptr, stride_l, part_f_ptr, row, n_chunks, tok))
        if LOGPROB == 2:
            tl.store(out_lp_ptr + row, tl.load(work_row + tok) - m - tl.log(zk))
        if COMMIT:
            commit_token(slot, tok, flags, iparams_ptr, counts_ptr, hist_ptr, V, H,
                         HAS_PENALTY, HAS_HIST)
    if COUNT:
        tl.atomic_add(passes_ptr + row, n_pass)


def select(
    logits: torch.Tensor,
    slots: torch.Tensor,
    fparams: torch.Tensor,
    iparams: torch.Tensor,
    seed: torch.Tensor,
    counts: torch.Tensor | None,
    hist: torch.Tensor | None,
    work: torch.Tensor | None,
    part_f: torch.Tensor,
    part_i: torch.Tensor,
    out_tok: torch.Tensor | None,
    out_lp: torch.Tensor | None,
    probs: torch.Tensor | None,
    *,
    chunks: int,
    has_filter: bool,
    logprob_mode: int,
    commit: bool,
    bands: tuple[torch.Tensor, torch.Tensor] | None = None,
    passes: torch.Tensor | None = None,
) -> None:
    """Launch :func:`_select_kernel` (grid ``[N]``) after
    :func:`~decodekit.kernels.process.process_logits`.

    ``probs`` given: write the processed distribution ``[N, V]`` and draw nothing.
    Otherwise write ``out_tok [N]`` (and ``out_lp [N]`` when ``logprob_mode`` is 1 raw /
    2 processed) and, with ``commit``, append the tokens to the slots' state (the slots
    must then be distinct). ``bands``: ``(fin_i, fin_f)`` of
    :func:`~decodekit.kernels.bands.banded_filter` (rows it resolved skip the pivot search).
    ``passes [N]`` int32: add the passes over each row made here.
    """
    N, V = logits.shape
    if chunks > layout.MAX_CHUNKS:
        raise ValueError(f"at most {layout.MAX_CHUNKS} chunks per row, got {chunks}")
    if (has_filter or probs is not None or logprob_mode == 2) and work is None:
        raise ValueError("filtering, probs and processed logprobs need the work buffer")
    dummy = iparams
    go = launch((N,), layout.BLOCK_SELECT)
    _select_kernel[go.grid](
        logits, logits.stride(0), slots, fparams, iparams, seed,
        counts if counts is not None else dummy,
        hist if hist is not None else dummy,
        work if work is not None else fparams,
        part_f, part_i,
        bands[0] if bands is not None else dummy, bands[1] if bands is not None else fparams,
        out_tok if out_tok is not None else seed,
        out_lp if out_lp is not None else fparams,
        probs if probs is not None else fparams,
        passes if passes is not None else dummy,
        V, chunks, hist.shape[1] if hist is not None else 1,
        HAS_FILTER=has_filter, HAS_PENALTY=counts is not None, HAS_HIST=hist is not None,
        LOGPROB=logprob_mode, PROBS=probs is not None, COMMIT=commit,
        BANDS=bands is not None and has_filter, COUNT=passes is not None,
        BLOCK=layout.BLOCK_SELECT, NP=layout.NUM_PIVOTS, num_warps=go.num_warps,
    )


# --------------------------------------------------------------------------- AOT configurations
def _signature(ldt: str) -> dict[str, str]:
    return {
        "logits_ptr": ldt, "stride_l": "i32", "slots_ptr": "*i32", "fparams_ptr": "*fp32",
        "iparams_ptr": "*i32", "seed_ptr": "*i64", "counts_ptr": "*i32", "hist_ptr": "*i32",
        "work_ptr": "*fp32", "part_f_ptr": "*fp32", "part_i_ptr": "*i32", "fin_i_ptr": "*i32",
        "fin_f_ptr": "*fp32", "out_tok_ptr": "*i64", "out_lp_ptr": "*fp32", "probs_ptr": "*fp32",
        "passes_ptr": "*i32", "V": "i32", "n_chunks": "i32", "H": "i32",
    }


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """Every configuration the sampler launches: ``(name, kernel, signature, constexprs,
    num_warps)``.

    Draws (with every commit/logprob combination) and probs (nothing committed; also the
    window rows), for fp32 and bf16 logits.
    """
    for ldt in ("*fp32", "*bf16"):
        for filt, pen, hist, lp, probs in product([False, True], [False, True], [False, True],
                                                  [0, 1, 2], [False, True]):
            if probs and (pen or hist or lp):
                continue
            for bands in ([False, True] if filt else [False]):
                yield "select", _select_kernel, _signature(ldt), dict(
                    HAS_FILTER=filt, HAS_PENALTY=pen, HAS_HIST=hist, LOGPROB=lp, PROBS=probs,
                    COMMIT=not probs, BANDS=bands, COUNT=False, BLOCK=layout.BLOCK_SELECT,
                    NP=layout.NUM_PIVOTS), launch((1,), layout.BLOCK_SELECT).num_warps
    yield "select_count", _select_kernel, _signature("*fp32"), dict(
        HAS_FILTER=True, HAS_PENALTY=False, HAS_HIST=False, LOGPROB=0, PROBS=False, COMMIT=True,
        BANDS=True, COUNT=True, BLOCK=layout.BLOCK_SELECT, NP=layout.NUM_PIVOTS), \
        launch((1,), layout.BLOCK_SELECT).num_warps
