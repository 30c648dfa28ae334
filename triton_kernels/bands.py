"""Banded filtering: top-k / top-p / typical-p thresholds in three passes over the row.

The algorithm, its exactness argument and a step-by-step torch model are in
``decodekit.sampling.few_pass``. Launches, after the process launch (pass 1, which also
records each chunk's smallest finite value), for the rows that filter by top-k, top-p or
typical-p:

* :func:`_hist_kernel` (pass 2, grid ``[N, chunks]``): counts of ``d = m - l`` in
  ``NBINS`` bins per chunk (``tl.histogram``, in registers).
* :func:`_plan_kernel` (grid ``[N]``, no pass): the bands around the guessed threshold bins.
* :func:`_gather_kernel` (pass 3, grid ``[N, chunks]``): band tokens are appended to the
  row's candidates (one atomic per tile); the others are aggregated per region (count, mass,
  min-p-kept mass and ``sum e (l - m)`` in fp64 across tiles, value range) and raced.
* :func:`_finish_kernel` (grid ``[N]``, at most ``CAP`` candidates, no pass): exact
  thresholds from the row walked in order (regions as aggregates, candidates sorted),
  verified; the token of the race; the thresholds as keys for the select launch.

The select launch then takes the token (``status == 1``) or, when the verification failed
(``status == 2``: a band over ``CAP`` tokens, a guess off by more than the margin), searches
the thresholds with its pivot passes as before. Rows that do not filter are skipped by every
launch here (``status == 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

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
    float_key,
    key_float,
    race_keys,
    row_keys,
)
from .launch import launch

__all__ = ["aot_configs", "banded_filter"]

NBAND = tl.constexpr(layout.NBAND)
NPLAN = tl.constexpr(layout.NPLAN)
RMAX = tl.constexpr(layout.RMAX)
MARGIN = tl.constexpr(layout.MARGIN)
SIDE = tl.constexpr(layout.SIDE)
NRF_I = tl.constexpr(2)  # int32 region fields: count, race winner
NRF_F = tl.constexpr(5)  # fp32: smallest, largest, kept smallest, kept largest, race key
NRF_D = tl.constexpr(3)  # fp64: mass, kept mass, kept sum e (l - m)
NFIN = tl.constexpr(4)  # per-row results: i32 status, token, cut key, distance key; f32 mass, centre


@triton.jit
def _banded(slot, flags, fparams_ptr, iparams_ptr):
    """Does this row filter by top-k, top-p or typical-p (the thresholds found here)?"""
    on = ((flags & F_FILTER) != 0) & ((flags & F_GREEDY) == 0)
    k = tl.load(iparams_ptr + slot * NI + I_TOPK)
    p = tl.load(fparams_ptr + slot * NF + F_TOPP)
    t = tl.load(fparams_ptr + slot * NF + F_TYP)
    return on & ((k > 0) | (p < 1.0) | (t < 1.0))


@triton.jit
def _row_range(part_f_ptr, row, n_chunks, NB: tl.constexpr):
    """Row max ``m`` (from the process launch's chunks) and bins per unit of ``d``."""
    cidx = tl.arange(0, MAX_CHUNKS)
    cm = cidx < n_chunks
    pf = part_f_ptr + (row * n_chunks + cidx) * NPART
    m = tl.max(tl.load(pf + 0, mask=cm, other=-float("inf")), axis=0)
    l_min = tl.min(tl.load(pf + 5, mask=cm, other=float("inf")), axis=0)
    r = tl.minimum(m - l_min, RMAX)
    inv_w = tl.where(r > 0, (NB - 1.0) / tl.where(r > 0, r, 1.0), 0.0)
    return m, inv_w


@triton.jit
def _bin(l, m, inv_w, NB: tl.constexpr):
    """Bin of finite values (0 holds the max, ``NB - 1`` the tail); 0 for ``-inf``."""
    d = tl.where(l > -float("inf"), (m - l) * inv_w, 0.0)
    return tl.minimum(tl.floor(d), NB - 1.0).to(tl.int32)


@triton.jit
def _hist_kernel(work_ptr, slots_ptr, fparams_ptr, iparams_ptr, part_f_ptr, hist_ptr, passes_ptr,
                 V, chunk, NB: tl.constexpr, BLOCK: tl.constexpr, COUNT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    if _banded(slot, flags, fparams_ptr, iparams_ptr):
        m, inv_w = _row_range(part_f_ptr, row, n_chunks, NB)
        acc = tl.zeros([NB], dtype=tl.int32)
        start0 = c * chunk
        end = tl.minimum(start0 + chunk, V)
        for start in range(start0, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            l = tl.load(work_ptr + row * V + offs, mask=offs < end, other=-float("inf"))
            acc += tl.histogram(_bin(l, m, inv_w, NB), NB, mask=l > -float("inf"))
        tl.store(hist_ptr + (row * n_chunks + c) * NB + tl.arange(0, NB), acc)
        if COUNT:
            if c == 0:
                tl.atomic_add(passes_ptr + row, 1)


@triton.jit
def _pick(vec, idx, i):
    """``vec[i]`` of a register vector (a scalar)."""
    return tl.sum(tl.where(idx == i, vec, 0), axis=0)


@triton.jit
def _edge_bins(h, cum_n, est, cum_z, centre, inv_w, k, p, min_e, t, NB: tl.constexpr):
    """Guessed threshold bins ``[NBAND]`` (-1: none): top-k, top-p, typical's upper and
    lower edges, from the counts and masses estimated at the bin centres."""
    idx = tl.arange(0, NB)
    n_fin = tl.sum(h, axis=0)
    has_k = (k > 0) & (k < n_fin)
    cut = tl.where(has_k, tl.sum((cum_n < k).to(tl.int32), axis=0), NB - 1)
    e_k = tl.where(has_k, cut, -1)
    before_z = tl.sum(tl.where(idx < cut, est, 0.0), axis=0)
    before_n = tl.sum(tl.where(idx < cut, h, 0), axis=0)
    h_cut = tl.maximum(_pick(h, idx, cut), 1)
    frac = tl.where(has_k, (k - before_n).to(tl.float32) / h_cut.to(tl.float32), 1.0)
    target = p * (before_z + _pick(est, idx, cut) * frac)
    cut_p = tl.minimum(cut, tl.sum((cum_z < target).to(tl.int32), axis=0))
    e_p = tl.where(p < 1.0, cut_p, -1)
    cut = tl.where(p < 1.0, cut_p, cut)
    top = cut
    if (min_e > 0.0) & (inv_w > 0.0):
        top = tl.minimum(top, tl.minimum(-tl.log(min_e) * inv_w, NB - 1.0).to(tl.int32))
    in_k = idx <= top
    zs = tl.where(in_k, est, 0.0)
    z = tl.sum(zs, axis=0)
    dc = tl.sum(zs * centre, axis=0) / tl.where(z > 0, z, 1.0)
    dist = tl.abs(centre - dc)
    lo = tl.zeros([], dtype=tl.float32)
    hi = tl.max(tl.where(in_k, dist, 0.0), axis=0)
    for _ in range(24):  # smallest distance whose bins hold t * z (bisection)
        mid = (lo + hi) * 0.5
        reach = tl.sum(tl.where(in_k & (dist <= mid), zs, 0.0), axis=0) >= t * z
        hi = tl.where(reach, mid, hi)
        lo = tl.where(reach, lo, mid)
    typ = (t < 1.0) & (z > 0)
    e_tu = tl.where(typ & (dc - hi > 0), ((dc - hi) * inv_w).to(tl.int32), -1)
    e_tl = tl.where(typ, tl.minimum((dc + hi) * inv_w, NB - 1.0).to(tl.int32), -1)
    j = tl.arange(0, NBAND)
    return tl.where(j == 0, e_k, tl.where(j == 1, e_p, tl.where(j == 2, e_tu, e_tl)))


@triton.jit
def _widen(edges, h, cum_n, NB: tl.constexpr):
    """Band ``[lo, hi]`` around each edge bin: MARGIN bins, then on until SIDE tokens lie on
    each side of the edge inside the band (see ``few_pass._widen``)."""
    idx = tl.arange(0, NB)
    cex = cum_n - h  # tokens in the bins before each bin
    at = idx[None, :] == edges[:, None]
    cex_e = tl.sum(tl.where(at, cex[None, :], 0), axis=1)
    cum_e = tl.sum(tl.where(at, cum_n[None, :], 0), axis=1)
    lo_ok = (idx[None, :] <= (edges - MARGIN)[:, None]) & ((cex_e[:, None] - cex[None, :]) >= SIDE)
    lo = tl.max(tl.where(lo_ok, idx[None, :], 0), axis=1)
    first = tl.minimum(edges + MARGIN, NB - 1)
    hi_ok = (idx[None, :] >= first[:, None]) & ((cum_n[None, :] - cum_e[:, None]) >= SIDE)
    hi = tl.min(tl.where(hi_ok, idx[None, :], NB - 1), axis=1)
    return lo, hi


@triton.jit
def _merge_bands(lo, hi, valid, cum_n, NB: tl.constexpr, CAPC: tl.constexpr):
    """Sorted, merged bands ``(lows, highs)`` ``[NBAND]`` (-1 padded); one band from bin 0
    when at most ``CAPC / 2`` tokens lie above the lowest band's end."""
    j = tl.arange(0, NBAND)
    out_lo = tl.full([NBAND], -1, tl.int32)
    out_hi = tl.full([NBAND], -1, tl.int32)
    n = 0
    cur_lo = -1
    cur_hi = -1
    for i in tl.static_range(NBAND):  # edges sorted ascending: lows and highs are monotone
        v = _pick(valid.to(tl.int32), j, i) != 0
        li = _pick(lo, j, i)
        hi_i = _pick(hi, j, i)
        merge = v & (cur_hi >= 0) & (li <= cur_hi + 1)
        flush = v & (cur_hi >= 0) & (~merge)
        out_lo = tl.where(flush & (j == n), cur_lo, out_lo)
        out_hi = tl.where(flush & (j == n), cur_hi, out_hi)
        n += flush.to(tl.int32)
        new_lo = tl.where(merge, cur_lo, li)
        new_hi = tl.where(merge, tl.maximum(cur_hi, hi_i), hi_i)
        cur_lo = tl.where(v, new_lo, cur_lo)
        cur_hi = tl.where(v, new_hi, cur_hi)
    out_lo = tl.where((cur_hi >= 0) & (j == n), cur_lo, out_lo)
    out_hi = tl.where((cur_hi >= 0) & (j == n), cur_hi, out_hi)
    idx = tl.arange(0, NB)
    few = (cur_hi >= 0) & (_pick(cum_n, idx, cur_hi) <= CAPC // 2)
    out_lo = tl.where(few, tl.where(j == 0, 0, -1), out_lo)
    out_hi = tl.where(few, tl.where(j == 0, cur_hi, -1), out_hi)
    return out_lo, out_hi


@triton.jit
def _plan_kernel(hist_ptr, slots_ptr, fparams_ptr, iparams_ptr, part_f_ptr, plan_ptr, n_chunks,
                 NB: tl.constexpr, CAPC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    j = tl.arange(0, NBAND)
    out_lo = tl.full([NBAND], -1, tl.int32)
    out_hi = tl.full([NBAND], -1, tl.int32)
    if _banded(slot, flags, fparams_ptr, iparams_ptr):
        idx = tl.arange(0, NB)
        h = tl.zeros([NB], dtype=tl.int32)
        for cc in range(n_chunks):
            h += tl.load(hist_ptr + (row * n_chunks + cc) * NB + idx)
        m, inv_w = _row_range(part_f_ptr, row, n_chunks, NB)
        w = tl.where(inv_w > 0, 1.0 / tl.where(inv_w > 0, inv_w, 1.0), 0.0)
        centre = tl.where(idx == NB - 1, NB * w, (idx + 0.5) * w)
        est = h.to(tl.float32) * tl.exp(-centre)
        cum_n = tl.cumsum(h, axis=0)
        edges = _edge_bins(h, cum_n, est, tl.cumsum(est, axis=0), centre, inv_w,
                           tl.load(iparams_ptr + slot * NI + I_TOPK),
                           tl.load(fparams_ptr + slot * NF + F_TOPP),
                           tl.load(fparams_ptr + slot * NF + F_MINP),
                           tl.load(fparams_ptr + slot * NF + F_TYP), NB)
        edges = tl.sort(tl.where(edges >= 0, edges, 2 * NB))
        lo, hi = _widen(tl.minimum(edges, NB - 1), h, cum_n, NB)
        out_lo, out_hi = _merge_bands(lo, hi, edges < 2 * NB, cum_n, NB, CAPC)
    tl.store(plan_ptr + row * NPLAN + j, out_lo)
    tl.store(plan_ptr + row * NPLAN + NBAND + j, out_hi)
    tl.store(plan_ptr + row * NPLAN + 2 * NBAND, 0)  # the gather's candidate counter


@triton.jit
def _no_regions(NR: tl.constexpr):
    """Empty region aggregates ``[NR]``: count, race winner, race key, mass, min-p-kept mass,
    its ``sum e (l - m)``, value range, min-p-kept value range."""
    zi = tl.zeros([NR], dtype=tl.int32)
    zd = tl.zeros([NR], dtype=tl.float64)
    up = tl.full([NR], float("inf"), tl.float32)
    down = tl.full([NR], -float("inf"), tl.float32)
    return zi, zi, tl.full([NR], -1.0, tl.float32), zd, zd, zd, up, down, up, down


@triton.jit
def _gather_kernel(work_ptr, slots_ptr, fparams_ptr, iparams_ptr, seed_ptr, part_f_ptr, plan_ptr,
                   cand_ptr, reg_i_ptr, reg_f_ptr, reg_d_ptr, passes_ptr, V, chunk,
                   NB: tl.constexpr, CAPC: tl.constexpr, NR: tl.constexpr, BLOCK: tl.constexpr,
                   COUNT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    if _banded(slot, flags, fparams_ptr, iparams_ptr):
        m, inv_w = _row_range(part_f_ptr, row, n_chunks, NB)
        min_e = tl.load(fparams_ptr + slot * NF + F_MINP)
        k1, k2 = row_keys(tl.load(seed_ptr + slot), tl.load(iparams_ptr + slot * NI + I_NGEN))
        j = tl.arange(0, NBAND)
        blo = tl.load(plan_ptr + row * NPLAN + j)
        bhi = tl.load(plan_ptr + row * NPLAN + NBAND + j)
        bval = bhi >= 0
        r = tl.arange(0, NR)
        cnt, win, best, z, kz, ks1, lo, hi, klo, khi = _no_regions(NR)
        start0 = c * chunk
        end = tl.minimum(start0 + chunk, V)
        for start in range(start0, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            l = tl.load(work_ptr + row * V + offs, mask=offs < end, other=-float("inf"))
            fin = l > -float("inf")
            b = _bin(l, m, inv_w, NB)
            band = tl.sum((bval[None, :] & (b[:, None] >= blo[None, :])
                           & (b[:, None] <= bhi[None, :])).to(tl.int32), axis=1) > 0
            reg = tl.sum((bval[None, :] & (b[:, None] > bhi[None, :])).to(tl.int32), axis=1)
            e = tl.exp(l - m)
            oh = (fin & (~band))[:, None] & (reg[:, None] == r[None, :])
            ohk = oh & (e >= min_e)[:, None]
            cnt += tl.sum(oh.to(tl.int32), axis=0)
            z += tl.sum(tl.where(oh, e[:, None], 0.0), axis=0).to(tl.float64)
            lo = tl.minimum(lo, tl.min(tl.where(oh, l[:, None], float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(oh, l[:, None], -float("inf")), axis=0))
            kz += tl.sum(tl.where(ohk, e[:, None], 0.0), axis=0).to(tl.float64)
            s1 = tl.where(e > 0, e * (l - m), 0.0)
            ks1 += tl.sum(tl.where(ohk, s1[:, None], 0.0), axis=0).to(tl.float64)
            klo = tl.minimum(klo, tl.min(tl.where(ohk, l[:, None], float("inf")), axis=0))
            khi = tl.maximum(khi, tl.max(tl.where(ohk, l[:, None], -float("inf")), axis=0))
            rb = tl.max(tl.where(ohk, best[None, :], -float("inf")), axis=1)  # its region's best
            key = tl.where(ohk, race_keys(e, tl.sum(ohk.to(tl.int32), axis=1) > 0, offs, k1, k2, rb)[:, None],
                           -1.0)
            kb = tl.max(key, axis=0)
            take = kb > best
            win = tl.where(take, start + tl.argmax(key, axis=0), win)
            best = tl.where(take, kb, best)
            cb = (fin & band).to(tl.int32)
            n_new = tl.sum(cb, axis=0)
            if n_new > 0:
                base = tl.atomic_add(plan_ptr + row * NPLAN + 2 * NBAND, n_new)
                pos = base + tl.cumsum(cb, axis=0) - 1
                tl.store(cand_ptr + row * CAPC + pos, offs, mask=(cb > 0) & (pos < CAPC))
        part = row * n_chunks + c
        tl.store(reg_i_ptr + (part * NRF_I + 0) * NR + r, cnt)
        tl.store(reg_i_ptr + (part * NRF_I + 1) * NR + r, win)
        tl.store(reg_f_ptr + (part * NRF_F + 0) * NR + r, lo)
        tl.store(reg_f_ptr + (part * NRF_F + 1) * NR + r, hi)
        tl.store(reg_f_ptr + (part * NRF_F + 2) * NR + r, klo)
        tl.store(reg_f_ptr + (part * NRF_F + 3) * NR + r, khi)
        tl.store(reg_f_ptr + (part * NRF_F + 4) * NR + r, best)
        tl.store(reg_d_ptr + (part * NRF_D + 0) * NR + r, z)
        tl.store(reg_d_ptr + (part * NRF_D + 1) * NR + r, kz)
        tl.store(reg_d_ptr + (part * NRF_D + 2) * NR + r, ks1)
        if COUNT:
            if c == 0:
                tl.atomic_add(passes_ptr + row, 1)


@triton.jit
def _combine_regions(reg_i_ptr, reg_f_ptr, reg_d_ptr, row, n_chunks, NR: tl.constexpr):
    """The gather's per-chunk region aggregates of one row, combined in chunk order."""
    r = tl.arange(0, NR)
    cnt, win, best, z, kz, ks1, lo, hi, klo, khi = _no_regions(NR)
    for cc in range(n_chunks):
        part = row * n_chunks + cc
        cnt += tl.load(reg_i_ptr + (part * NRF_I + 0) * NR + r)
        z += tl.load(reg_d_ptr + (part * NRF_D + 0) * NR + r)
        kz += tl.load(reg_d_ptr + (part * NRF_D + 1) * NR + r)
        ks1 += tl.load(reg_d_ptr + (part * NRF_D + 2) * NR + r)
        lo = tl.minimum(lo, tl.load(reg_f_ptr + (part * NRF_F + 0) * NR + r))
        hi = tl.maximum(hi, tl.load(reg_f_ptr + (part * NRF_F + 1) * NR + r))
        klo = tl.minimum(klo, tl.load(reg_f_ptr + (part * NRF_F + 2) * NR + r))
        khi = tl.maximum(khi, tl.load(reg_f_ptr + (part * NRF_F + 3) * NR + r))
        kb = tl.load(reg_f_ptr + (part * NRF_F + 4) * NR + r)
        take = kb > best
        win = tl.where(take, tl.load(reg_i_ptr + (part * NRF_I + 1) * NR + r), win)
        best = tl.where(take, kb, best)
    return cnt, win, best, z, kz, ks1, lo, hi, klo, khi


@triton.jit
def _candidates(work_ptr, cand_ptr, row, V, n, m, inv_w, blo, bval,
                NB: tl.constexpr, CAPC: tl.constexpr, W: tl.constexpr):
    """The row's ``n <= W`` candidates (row stride ``CAPC``), in gather order:
    ``(l, id, e, band, valid)`` ``[W]``; ``band`` = the region just above the candidate."""
    jj = tl.arange(0, W)
    valid = jj < n
    ids = tl.load(cand_ptr + row * CAPC + jj, mask=valid, other=0)
    l = tl.load(work_ptr + row * V + ids, mask=valid, other=-float("inf"))
    e = tl.where(valid, tl.exp(l - m), 0.0)
    b = _bin(l, m, inv_w, NB)
    j = tl.arange(0, NBAND)
    band = tl.sum(((bval & (j >= 1))[None, :] & (b[:, None] >= blo[None, :])).to(tl.int32), axis=1)
    return l, ids, e, band, valid


@triton.jit
def _kth(l, valid, cnt, lo, k):
    """Largest key ``u`` with ``count(>= u) >= k``, regions counted when wholly ``>= u``:
    the k-th largest value when it is a candidate (bisection over the fp32 keys)."""
    kc = float_key(l)
    a = tl.full([], KEY_NEG_INF, tl.int64)
    b = tl.full([], KEY_POS_INF + 1, tl.int64)
    while b - a > 1:
        u = a + (b - a) // 2
        n = tl.sum((valid & (kc >= u)).to(tl.int32), axis=0) \
            + tl.sum(tl.where((cnt > 0) & (float_key(lo) >= u), cnt, 0), axis=0)
        a = tl.where(n >= k, u, a)
        b = tl.where(n >= k, b, u)
    return key_float(a.to(tl.int32))


@triton.jit
def _top_cut(l, e, band, valid, cnt, z, lo, hi, k, p, NR: tl.constexpr, CAPC: tl.constexpr):
    """Exact lower cut of top-k then top-p (``-inf``: none) and whether it could be verified
    (``few_pass._top_cut``; ranks and masses above by bisection, regions as aggregates)."""
    r = tl.arange(0, NR)
    before = valid[:, None] & (band[:, None] < r[None, :])  # [CAPC, NR] candidates before each region
    # top-k: the k-th token must be a candidate or a region's last token
    n_fin = tl.sum(cnt, axis=0) + tl.sum(valid.to(tl.int32), axis=0)
    has_k = (k > 0) & (k < n_fin)
    start = tl.cumsum(cnt, axis=0) - cnt + tl.sum(before.to(tl.int32), axis=0)
    in_r = (cnt > 0) & (start < k) & (k <= start + cnt)
    ends = in_r & (k == start + cnt)
    ok = (~has_k) | (tl.sum((in_r & (~ends)).to(tl.int32), axis=0) == 0)
    kth = tl.where(tl.sum(ends.to(tl.int32), axis=0) > 0,
                   tl.max(tl.where(ends, lo, -float("inf")), axis=0), _kth(l, valid, cnt, lo, k))
    kth = tl.where(has_k, kth, -float("inf"))
    # top-p: a token stays while the mass strictly above its value is below p * Z_k
    ink_c = valid & (l >= kth)
    ink_r = (cnt > 0) & (lo >= kth)
    ze = tl.where(ink_c, e, 0.0).to(tl.float64)
    zr = tl.where(ink_r, z, 0.0)
    target = p * (tl.sum(zr, axis=0) + tl.sum(ze, axis=0)).to(tl.float32)
    above_r = tl.cumsum(zr, axis=0) - zr + tl.sum(tl.where(before, ze[:, None], 0.0), axis=0)
    n_before_r = tl.cumsum(ink_r.to(tl.int32), axis=0) - ink_r.to(tl.int32) \
        + tl.sum((before & ink_c[:, None]).to(tl.int32), axis=0)
    all_r = (above_r + z).to(tl.float32) < target
    none_r = above_r.to(tl.float32) >= target
    lone = (n_before_r == 0) & (cnt == 1)
    kept_r = ink_r & (all_r | lone)
    ok = ok & ((p >= 1.0) | (tl.sum((ink_r & (~all_r) & (~lone) & (~none_r)).to(tl.int32), axis=0) == 0))
    # smallest key whose mass above (regions wholly above, candidates above) is below target
    kc = float_key(l)
    a = float_key(kth).to(tl.int64) - 1
    b = tl.full([], KEY_POS_INF, tl.int64)
    while b - a > 1:
        u = a + (b - a) // 2
        x = key_float(u.to(tl.int32))
        above = tl.sum(tl.where(ink_r & (lo > x), z, 0.0), axis=0) + tl.sum(tl.where(kc > u, ze, 0.0), axis=0)
        a = tl.where(above.to(tl.float32) < target, a, u)
        b = tl.where(above.to(tl.float32) < target, u, b)
    kept_c = ink_c & (kc >= b)
    tp = tl.minimum(tl.min(tl.where(kept_r, lo, float("inf")), axis=0),
                    tl.min(tl.where(kept_c, l, float("inf")), axis=0))
    cut = tl.where(p < 1.0, tl.maximum(kth, tp), kth)
    ok = ok & (tl.sum(((cnt > 0) & (lo < cut) & (cut <= hi)).to(tl.int32), axis=0) == 0)
    return cut, ok


@triton.jit
def _typical(l, e, keep, m, kept_r, kz, ks1, klo, khi, t, NR: tl.constexpr, CAPC: tl.constexpr):
    """Typical-p over the kept set: ``(c, dstar, regions kept, ok)``; tokens with
    ``|l - c| <= dstar`` stay (``few_pass._typical_dstar``; the smallest distance whose mass
    reaches the target by bisection, exact unless a region straddles it)."""
    kr = kept_r & (kz > 0)
    ek = tl.where(keep, e, 0.0)
    zk = (tl.sum(tl.where(kept_r, kz, 0.0), axis=0) + tl.sum(ek.to(tl.float64), axis=0)).to(tl.float32)
    s1c = tl.where(keep & (ek > 0), ek * (l - m), 0.0).to(tl.float64)
    s1 = (tl.sum(tl.where(kept_r, ks1, 0.0), axis=0) + tl.sum(s1c, axis=0)).to(tl.float32)
    ent = tl.log(zk) - s1 / zk
    c = m + tl.log(zk) - ent
    target = t * zk
    da = tl.abs(klo - c)
    db = tl.abs(khi - c)
    span_lo = tl.where((klo <= c) & (c <= khi), 0.0, tl.minimum(da, db))
    span_hi = tl.maximum(da, db)
    kd = float_key(tl.where(keep, tl.abs(l - c), float("inf")))
    ks = float_key(span_hi)
    a = tl.full([], -1, tl.int64)
    b = tl.full([], KEY_POS_INF + 1, tl.int64)
    while b - a > 1:  # smallest distance key u with M(u) >= target
        u = a + (b - a) // 2
        mass = tl.sum(tl.where(kd <= u, ek, 0.0).to(tl.float64), axis=0) \
            + tl.sum(tl.where(kr & (ks <= u), kz, 0.0), axis=0)
        a = tl.where(mass.to(tl.float32) >= target, a, u)
        b = tl.where(mass.to(tl.float32) >= target, u, b)
    dstar = key_float(tl.minimum(b, KEY_POS_INF).to(tl.int32))
    ok = b <= KEY_POS_INF
    # no region straddles or ends at dstar, and none straddling just below could reach the target
    ok = ok & (tl.sum((kr & (((span_lo <= dstar) & (dstar < span_hi)) | (span_hi == dstar))).to(tl.int32),
                      axis=0) == 0)
    below = b - 1
    x = key_float(tl.maximum(below, 0).to(tl.int32))
    m_hi = tl.sum(tl.where(kd <= below, ek, 0.0).to(tl.float64), axis=0) \
        + tl.sum(tl.where(kr & (span_lo <= x), kz, 0.0), axis=0)
    ok = ok & ((below < 0) | (m_hi.to(tl.float32) < target))
    return c, dstar, kept_r & (span_hi <= dstar), ok


@triton.jit
def _resolve(work_ptr, cand_ptr, slot, row, V, n, m, inv_w, blo, bval, fparams_ptr, iparams_ptr, seed_ptr,
             cnt, win, best, z, kz, ks1, lo, hi, klo, khi,
             NB: tl.constexpr, CAPC: tl.constexpr, W: tl.constexpr, NR: tl.constexpr):
    """Exact thresholds and the token of one row from its ``n <= W`` candidates and region
    aggregates: ``(ok, token, cut, typical centre, distance key, kept mass)``."""
    l, ids, e, band, valid = _candidates(work_ptr, cand_ptr, row, V, n, m, inv_w, blo, bval, NB, CAPC, W)
    t = tl.load(fparams_ptr + slot * NF + F_TYP)
    min_e = tl.load(fparams_ptr + slot * NF + F_MINP)
    cut, ok = _top_cut(l, e, band, valid, cnt, z, lo, hi, tl.load(iparams_ptr + slot * NI + I_TOPK),
                       tl.load(fparams_ptr + slot * NF + F_TOPP), NR, W)
    keep = valid & (l >= cut) & (e >= min_e)
    kept_r = (cnt > 0) & (lo >= cut)
    c = 0.0
    dkey = float_key(tl.full([], float("inf"), tl.float32))
    if t < 1.0:
        c, dstar, kept_r, ok_t = _typical(l, e, keep, m, kept_r, kz, ks1, klo, khi, t, NR, W)
        keep = keep & (tl.abs(l - c) <= dstar)
        ok = ok & ok_t
        dkey = float_key(dstar)
    k1, k2 = row_keys(tl.load(seed_ptr + slot), tl.load(iparams_ptr + slot * NI + I_NGEN))
    rb = tl.where(kept_r & (kz > 0), best, -1.0)
    key = race_keys(e, keep, ids, k1, k2, tl.max(rb, axis=0))  # a region winner above: no log
    kb = tl.max(key, axis=0)
    tok_c = tl.sum(tl.where(tl.arange(0, W) == tl.argmax(key, axis=0), ids, 0), axis=0)
    tok_r = tl.sum(tl.where(tl.arange(0, NR) == tl.argmax(rb, axis=0), win, 0), axis=0)
    tok = tl.where(tl.max(rb, axis=0) > kb, tok_r, tok_c)
    zk = (tl.sum(tl.where(kept_r, kz, 0.0), axis=0)
          + tl.sum(tl.where(keep, e, 0.0).to(tl.float64), axis=0)).to(tl.float32)
    return ok, tok, cut, c, dkey, zk


@triton.jit
def _finish_kernel(work_ptr, slots_ptr, fparams_ptr, iparams_ptr, seed_ptr, part_f_ptr, plan_ptr,
                   cand_ptr, reg_i_ptr, reg_f_ptr, reg_d_ptr, fin_i_ptr, fin_f_ptr, V, n_chunks,
                   NB: tl.constexpr, CAPC: tl.constexpr, SMALL: tl.constexpr, NR: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    flags = tl.load(iparams_ptr + slot * NI + I_FLAGS)
    status = 0
    tok = 0
    zk = 0.0
    c = 0.0
    tkey = float_key(tl.full([], -float("inf"), tl.float32))
    dkey = float_key(tl.full([], float("inf"), tl.float32))
    if _banded(slot, flags, fparams_ptr, iparams_ptr):
        m, inv_w = _row_range(part_f_ptr, row, n_chunks, NB)
        cnt, win, best, z, kz, ks1, lo, hi, klo, khi = _combine_regions(
            reg_i_ptr, reg_f_ptr, reg_d_ptr, row, n_chunks, NR)
        j = tl.arange(0, NBAND)
        blo = tl.load(plan_ptr + row * NPLAN + j)
        bval = tl.load(plan_ptr + row * NPLAN + NBAND + j) >= 0
        n = tl.load(plan_ptr + row * NPLAN + 2 * NBAND)
        cut = 0.0
        ok = n <= CAPC
        if n <= SMALL:  # most rows: a narrow program
            ok, tok, cut, c, dkey, zk = _resolve(
                work_ptr, cand_ptr, slot, row, V, n, m, inv_w, blo, bval, fparams_ptr, iparams_ptr, seed_ptr,
                cnt, win, best, z, kz, ks1, lo, hi, klo, khi, NB, CAPC, SMALL, NR)
        elif n <= CAPC:
            ok, tok, cut, c, dkey, zk = _resolve(
                work_ptr, cand_ptr, slot, row, V, n, m, inv_w, blo, bval, fparams_ptr, iparams_ptr, seed_ptr,
                cnt, win, best, z, kz, ks1, lo, hi, klo, khi, NB, CAPC, CAPC, NR)
        tkey = float_key(cut)
        status = tl.where(ok, 1, 2)
    tl.store(fin_i_ptr + row * NFIN + 0, status)
    tl.store(fin_i_ptr + row * NFIN + 1, tok)
    tl.store(fin_i_ptr + row * NFIN + 2, tkey)
    tl.store(fin_i_ptr + row * NFIN + 3, dkey)
    tl.store(fin_f_ptr + row * NFIN + 0, zk)
    tl.store(fin_f_ptr + row * NFIN + 1, c)


class BandBuffers:
    """Scratch of the banded launches for ``rows`` rows split in ``chunks`` programs each
    (grown on demand by :meth:`fit`; never freed between steps)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows = self.parts = 0
        self.fit(1, 1)

    def fit(self, rows: int, chunks: int) -> BandBuffers:
        parts = rows * chunks
        if rows > self.rows or parts > self.parts:
            rows, parts = max(rows, self.rows), max(parts, self.parts)
            dev, i32 = self.device, torch.int32
            self.hist = torch.empty(parts * layout.NBINS, dtype=i32, device=dev)
            self.reg_i = torch.empty(parts * 2 * layout.NREG, dtype=i32, device=dev)
            self.reg_f = torch.empty(parts * 5 * layout.NREG, dtype=torch.float32, device=dev)
            self.reg_d = torch.empty(parts * 3 * layout.NREG, dtype=torch.float64, device=dev)
            self.plan = torch.empty(rows, layout.NPLAN, dtype=i32, device=dev)
            self.cand = torch.empty(rows, layout.CAP, dtype=i32, device=dev)
            self.fin_i = torch.empty(rows, 4, dtype=i32, device=dev)
            self.fin_f = torch.empty(rows, 4, dtype=torch.float32, device=dev)
            self.rows, self.parts = rows, parts
        return self


def banded_filter(work: torch.Tensor, n_rows: int, slots: torch.Tensor, fparams: torch.Tensor,
                  iparams: torch.Tensor, seed: torch.Tensor, part_f: torch.Tensor, buf: BandBuffers,
                  *, chunks: int, chunk: int, passes: torch.Tensor | None = None) -> None:
    """Launches 2-5 of a filtered step over the first ``n_rows`` rows of ``work [., V]`` (the
    processed logits of the process launch, split in ``chunks`` programs of ``chunk``
    columns). Results in ``buf.fin_i [n_rows, 4]`` (status, token, cut key, distance key) and
    ``buf.fin_f`` (kept mass, typical centre) for :func:`~decodekit.kernels.select.select`.
    ``passes [n_rows]`` int32 (optional) counts the passes over each row."""
    V = work.shape[1]
    if chunk % layout.BLOCK_BANDS:
        raise ValueError(f"chunk {chunk} is not a multiple of {layout.BLOCK_BANDS}")
    buf.fit(n_rows, chunks)
    count = passes is not None
    passes = passes if count else buf.fin_i
    go = launch((n_rows, chunks), layout.BLOCK_BANDS)
    _hist_kernel[go.grid](work, slots, fparams, iparams, part_f, buf.hist, passes, V, chunk,
                          NB=layout.NBINS, BLOCK=layout.BLOCK_BANDS, COUNT=count, num_warps=go.num_warps)
    go = launch((n_rows,), layout.NBINS)
    _plan_kernel[go.grid](buf.hist, slots, fparams, iparams, part_f, buf.plan, chunks,
                          NB=layout.NBINS, CAPC=layout.CAP, num_warps=go.num_warps)
    go = launch((n_rows, chunks), layout.BLOCK_BANDS)
    _gather_kernel[go.grid](work, slots, fparams, iparams, seed, part_f, buf.plan, buf.cand,
                            buf.reg_i, buf.reg_f, buf.reg_d, passes, V, chunk,
                            NB=layout.NBINS, CAPC=layout.CAP, NR=layout.NREG,
                            BLOCK=layout.BLOCK_BANDS, COUNT=count, num_warps=go.num_warps)
    go = launch((n_rows,), layout.CAP)
    _finish_kernel[go.grid](work, slots, fparams, iparams, seed, part_f, buf.plan, buf.cand,
                            buf.reg_i, buf.reg_f, buf.reg_d, buf.fin_i, buf.fin_f, V, chunks,
                            NB=layout.NBINS, CAPC=layout.CAP, SMALL=layout.CAP_SMALL, NR=layout.NREG,
                            num_warps=go.num_warps)


# --------------------------------------------------------------------------- AOT configurations
_COMMON = {"work_ptr": "*fp32", "slots_ptr": "*i32", "fparams_ptr": "*fp32", "iparams_ptr": "*i32",
           "part_f_ptr": "*fp32"}


def _ordered(fn: object, sig: dict[str, str]) -> dict[str, str]:
    return {n: sig[n] for n in fn.arg_names if n in sig}  # type: ignore[attr-defined]


def aot_configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """The four banded launches, with and without pass counting."""
    for name, fn, sig, cfg, warps in _configs():
        yield name, fn, _ordered(fn, sig), cfg, warps


def _configs() -> Iterator[tuple[str, object, dict[str, str], dict[str, object], int]]:
    nb, cap, nr, blk = layout.NBINS, layout.CAP, layout.NREG, layout.BLOCK_BANDS
    split = launch((1, 1), blk).num_warps
    for count in (False, True):
        yield "bands_hist", _hist_kernel, _COMMON | {
            "hist_ptr": "*i32", "passes_ptr": "*i32", "V": "i32", "chunk": "i32"}, \
            dict(NB=nb, BLOCK=blk, COUNT=count), split
        yield "bands_gather", _gather_kernel, _COMMON | {
            "seed_ptr": "*i64", "plan_ptr": "*i32", "cand_ptr": "*i32", "reg_i_ptr": "*i32",
            "reg_f_ptr": "*fp32", "reg_d_ptr": "*fp64", "passes_ptr": "*i32", "V": "i32",
            "chunk": "i32"}, dict(NB=nb, CAPC=cap, NR=nr, BLOCK=blk, COUNT=count), split
    sig = {k: v for k, v in _COMMON.items() if k != "work_ptr"}
    yield "bands_plan", _plan_kernel, {"hist_ptr": "*i32"} | sig | {"plan_ptr": "*i32", "n_chunks": "i32"}, \
        dict(NB=nb, CAPC=cap), launch((1,), nb).num_warps
    yield "bands_finish", _finish_kernel, _COMMON | {
        "seed_ptr": "*i64", "plan_ptr": "*i32", "cand_ptr": "*i32", "reg_i_ptr": "*i32",
        "reg_f_ptr": "*fp32", "reg_d_ptr": "*fp64", "fin_i_ptr": "*i32", "fin_f_ptr": "*fp32",
        "V": "i32", "n_chunks": "i32"}, dict(NB=nb, CAPC=cap, SMALL=layout.CAP_SMALL, NR=nr), \
        launch((1,), cap).num_warps
