"""Filtering in three passes over the row: the algorithm of the banded select launches
(:mod:`decodekit.kernels.bands`), step by step in torch (one row, fp32), and their oracle.

Every filter keeps an interval of the processed logits ``l`` (top-k, top-p and min-p a top
interval, typical-p a band around ``c``; see :func:`decodekit.sampling.reference.filter_keep`).
Instead of searching each threshold with repeated pivot passes, the kernels

1. **pass 1** (the process launch, unchanged): the row's max ``m`` and smallest finite value;
2. **pass 2** (histogram): count the tokens in ``NBINS - 1`` equal bins of ``d = m - l`` over
   ``[0, R]`` (``R`` the row's finite range, at most :data:`RMAX`) plus one tail bin;
3. **plan** (per row, ``NBINS`` numbers, no pass): guess from the counts (masses estimated at
   the bin centres) the bins that hold each threshold -- the top-k / top-p cut and typical-p's
   two edges -- and widen each by :data:`MARGIN` bins into *bands*;
4. **pass 3** (gather): every token of a band is gathered (value, id) into a buffer of
   :data:`CAP` candidates per row; every other token is aggregated into the *region* between
   two bands (count, mass, the min-p-kept mass, its ``sum e (l - m)``, smallest and largest
   value), and the race runs over each region's min-p-kept tokens in the same pass;
5. **finish** (per row, at most ``CAP`` candidates, no pass): walk the row in order -- regions
   as aggregates, candidates sorted -- and compute every threshold exactly as the reference
   does; then *verify* that each threshold fell on a candidate (or on a region's edge), that no
   region is split by one, and that nothing overflowed.

Why it is exact: bins are intervals of ``l`` and every token's bin is computed by the same fp32
operations in passes 2 and 3, so tied values share a bin and each region is an interval of the
sorted row. Top-k needs only ranks, top-p only the mass above a token, typical-p only the mass
of tokens closer to ``c`` than a distance: a region contributes to them as a whole unless a
threshold falls inside it, which the verification detects (the guess only decides where the
candidates are, never the answer). When it fails -- a band wider than ``CAP`` tokens, a guess
off by more than the margin -- the row falls back to the pivot search (bounded: 32-bit keys,
``NUM_PIVOTS`` pivots per pass), counted separately. The kernels find the same thresholds
without sorting (bisections over the candidates' fp32 keys: the k-th largest, the smallest
value whose mass above stays below the target, the smallest distance whose mass reaches it)
and guess typical-p's band by bisection rather than by sorting the bins; the answer is the
same, only the guess may differ. Masses are summed in a different order
than the reference's sort, so a token within fp32 rounding of a threshold may differ, as with
any two implementations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..kernels.layout import CAP, MARGIN, NBINS, RMAX, SIDE

__all__ = ["CAP", "MARGIN", "NBINS", "RMAX", "SIDE", "FewPass", "few_pass_keep"]


@dataclass
class FewPass:
    """What :func:`few_pass_keep` did for one row: ``passes`` over the row (1 process + 1
    histogram + 1 gather, or fewer), the candidates gathered, the bands, and why it fell
    back (``None`` if it did not)."""

    passes: int
    candidates: int
    bands: list[tuple[int, int]]
    fallback: str | None = None


@dataclass
class _Region:
    """Aggregates of the tokens between two bands (pass 3)."""

    cnt: int = 0
    z: float = 0.0  # sum of e = exp(l - m), all tokens
    lo: float = math.inf  # smallest value, all tokens
    hi: float = -math.inf
    kz: float = 0.0  # min-p-kept tokens: sum of e
    ks1: float = 0.0  # min-p-kept tokens: sum of e (l - m)
    klo: float = math.inf  # min-p-kept tokens: smallest / largest value
    khi: float = -math.inf


def _bins(l: torch.Tensor, m: torch.Tensor, inv_w: torch.Tensor) -> torch.Tensor:
    """Bin of each token (fp32 arithmetic the kernels repeat): 0 holds the max, NBINS - 1 the
    tail; non-finite tokens get -1."""
    b = ((m - l) * inv_w).floor().clamp(max=NBINS - 1)
    return torch.where(torch.isfinite(l), b, -1.0).long()


def _plan(h: torch.Tensor, inv_w: float, k: int, top_p: float, min_p: float,
          typ: float) -> list[tuple[int, int]]:
    """Bands (inclusive bin intervals, sorted, merged) around the guessed threshold bins."""
    w = 1.0 / inv_w if inv_w > 0 else 0.0
    centre = (torch.arange(NBINS, dtype=torch.float64) + 0.5) * w
    centre[-1] = (NBINS - 1) * w + w  # the tail: just beyond the range
    est = h.double() * torch.exp(-centre)
    cum_n, cum_z = h.cumsum(0), est.cumsum(0)
    n_fin = int(cum_n[-1])
    edges: list[int] = []
    cut = NBINS - 1
    if 0 < k < n_fin:
        cut = int(torch.searchsorted(cum_n, torch.tensor(k)))
        edges.append(cut)
    if top_p < 1.0:
        before = float(cum_z[cut - 1]) if cut > 0 else 0.0
        frac = (k - int(cum_n[cut - 1] if cut > 0 else 0)) / max(int(h[cut]), 1) if 0 < k < n_fin else 1.0
        target = top_p * (before + float(est[cut]) * frac)
        cut = min(cut, int(torch.searchsorted(cum_z, torch.tensor(target, dtype=torch.float64))))
        edges.append(cut)
    if typ < 1.0:
        top = cut
        if min_p > 0.0 and inv_w > 0:
            top = min(top, int(-math.log(min_p) * inv_w))
        zs, ds = est[: top + 1], centre[: top + 1]
        z = float(zs.sum())
        if z > 0:
            dc = float((zs * ds).sum()) / z  # m - c
            dist = (ds - dc).abs()
            order = dist.argsort()
            reach = int(torch.searchsorted(zs[order].cumsum(0), torch.tensor(typ * z, dtype=torch.float64)))
            dstar = float(dist[order[min(reach, len(order) - 1)]])
            if dc - dstar > 0:
                edges.append(int((dc - dstar) * inv_w))
            edges.append(min(int((dc + dstar) * inv_w), NBINS - 1))
    bands: list[tuple[int, int]] = []
    for e in sorted(set(edges)):
        lo, hi = _widen(h, e)
        if bands and lo <= bands[-1][1] + 1:
            bands[-1] = (bands[-1][0], max(bands[-1][1], hi))
        else:
            bands.append((lo, hi))
    if bands and int(cum_n[bands[-1][1]]) <= CAP // 2:  # few tokens above the cut: take them all
        bands = [(0, bands[-1][1])]
    return bands


def _widen(h: torch.Tensor, e: int) -> tuple[int, int]:
    """Band around bin ``e``: :data:`MARGIN` bins each side, then on until :data:`SIDE` tokens
    lie on each side of ``e`` inside the band (sparse top bins: the neighbouring tokens)."""
    lo, hi = max(0, e - MARGIN), min(NBINS - 1, e + MARGIN)
    while lo > 0 and int(h[lo:e].sum()) < SIDE:
        lo -= 1
    while hi < NBINS - 1 and int(h[e + 1:hi + 1].sum()) < SIDE:
        hi += 1
    return lo, hi


def _gather(l: torch.Tensor, e: torch.Tensor, b: torch.Tensor, bands: list[tuple[int, int]],
            min_p: float) -> tuple[list[_Region], torch.Tensor]:
    """Pass 3: region aggregates (``len(bands) + 1``, top to bottom) and the candidates' ids."""
    region = torch.zeros_like(b)
    in_band = torch.zeros_like(b, dtype=torch.bool)
    for lo, hi in bands:
        region += (b > hi).long()
        in_band |= (b >= lo) & (b <= hi)
    fin = b >= 0
    regions = []
    for r in range(len(bands) + 1):
        sel = fin & ~in_band & (region == r)
        ksel = sel & (e >= min_p)
        lr, er, lk, ek = l[sel], e[sel], l[ksel], e[ksel]
        regions.append(_Region(  # sums in fp64 (the kernels: fp32 tiles, fp64 across tiles)
            int(sel.sum()), float(er.double().sum()), float(lr.min()) if len(lr) else math.inf,
            float(lr.max()) if len(lr) else -math.inf, float(ek.double().sum()),
            float(torch.where(ek > 0, ek * (lk - l.max()), 0.0).double().sum()),
            float(lk.min()) if len(lk) else math.inf, float(lk.max()) if len(lk) else -math.inf))
    return regions, (fin & in_band).nonzero().flatten()


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


class _Fail(Exception):
    """The verification failed: the row falls back to the pivot search."""


def _top_cut(cl: torch.Tensor, ce: torch.Tensor, cband: torch.Tensor, regions: list[_Region],
             k: int, top_p: float) -> float:
    """The exact lower cut of top-k then top-p (``-inf`` if none): every token ``>= cut`` is
    kept. ``cl``/``ce``/``cband``: candidates sorted by value (descending) and their band."""
    n_fin = sum(r.cnt for r in regions) + len(cl)
    # the row in order: region 0, band 0's candidates, region 1, ...
    items: list[tuple[str, int]] = []
    for r in range(len(regions)):
        items.append(("r", r))
        items += [("c", j) for j in (cband == r).nonzero().flatten().tolist()]
    kth = -math.inf
    if 0 < k < n_fin:
        seen = 0
        for kind, i in items:
            if kind == "r":
                if seen < k <= seen + regions[i].cnt:
                    if seen + regions[i].cnt == k:  # the k-th largest is the region's smallest
                        kth = regions[i].lo
                        break
                    raise _Fail("top-k cut inside a region")
                seen += regions[i].cnt
            else:
                seen += 1
                if seen == k:
                    kth = float(cl[i])
                    break
    if top_p >= 1.0:
        return kth
    zk = sum(r.z for r in regions if r.cnt and r.lo >= kth) + float(ce[cl >= kth].double().sum())
    target = _f32(top_p) * _f32(zk)
    above = 0.0  # fp64 running sums, compared after rounding to fp32
    tp = None
    for kind, i in items:
        if kind == "r":
            reg = regions[i]
            if not reg.cnt or reg.lo < kth:
                continue
            if _f32(above + reg.z) < target or tp is None:  # the first token is always kept
                if not _f32(above + reg.z) < target and reg.cnt > 1:
                    raise _Fail("top-p cut inside the first region")
                tp = reg.lo
            elif _f32(above) < target:
                raise _Fail("top-p cut inside a region")
            above += reg.z
        elif float(cl[i]) >= kth:
            if _f32(above) < target or tp is None:
                tp = float(cl[i])
            above += float(ce[i])
    return max(kth, tp if tp is not None else -math.inf)


def _typical_dstar(cl: torch.Tensor, ce: torch.Tensor, keep: torch.Tensor, regions: list[_Region],
                   kept_r: list[bool], m: float, typ: float) -> tuple[float, float]:
    """Typical-p over the kept set: ``(c, dstar)``, tokens with ``|l - c| <= dstar`` stay."""
    f32 = _f32
    ek = torch.where(keep, ce, 0.0)
    zk = f32(sum(r.kz for r, k in zip(regions, kept_r, strict=True) if k) + float(ek.double().sum()))
    s1 = f32(sum(r.ks1 for r, k in zip(regions, kept_r, strict=True) if k)
             + float(torch.where(keep & (ek > 0), ek * (cl - m), 0.0).double().sum()))
    ent = torch.log(zk) - s1 / zk
    c = f32(m) + torch.log(zk) - ent
    target = f32(typ) * zk
    spans = []  # d range of each kept region
    for r, k in zip(regions, kept_r, strict=True):
        if k and r.kz > 0:
            a, b = (f32(r.klo) - c).abs(), (f32(r.khi) - c).abs()
            lo = f32(0.0) if r.klo <= float(c) <= r.khi else torch.minimum(a, b)
            spans.append((float(lo), float(torch.maximum(a, b)), r.kz))
    d = torch.where(keep, (cl - c).abs(), math.inf)
    events = sorted({float(x) for x in d[keep]} | {s[1] for s in spans})
    for x in events:
        lo64 = float(ce[keep & (d <= x)].double().sum()) + sum(s[2] for s in spans if s[1] <= x)
        m_lo, m_hi = f32(lo64), f32(lo64 + sum(s[2] for s in spans if s[0] <= x < s[1]))
        if m_lo >= target:
            if m_hi != m_lo or any(s[1] == x for s in spans):
                raise _Fail("typical edge inside a region")
            return float(c), x
        if m_hi >= target:
            raise _Fail("typical edge inside a region")
    raise _Fail("typical walk ran off the candidates")


def few_pass_keep(l: torch.Tensor, k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  typ: float = 1.0) -> tuple[torch.Tensor | None, FewPass]:
    """Kept mask of one row ``l [V]`` (fp32 processed logits) by the three-pass algorithm, or
    ``None`` when it falls back to the pivot search; and what it did."""
    fin = torch.isfinite(l)
    m = l.max()
    if not (k > 0 or top_p < 1.0 or typ < 1.0):  # min-p alone: its cut is exp(l - m) >= min_p
        return (torch.exp(l - m) >= min_p) & fin, FewPass(2, 0, [])
    lmin = l[fin].min()
    R = torch.clamp(m - lmin, max=RMAX)
    inv_w = (NBINS - 1) / R if float(R) > 0 else torch.tensor(0.0)
    b = _bins(l, m, inv_w)  # pass 2
    h = torch.bincount(b[b >= 0], minlength=NBINS)
    bands = _plan(h, float(inv_w), k, top_p, min_p, typ)
    e = torch.exp(l - m)
    regions, cand = _gather(l, e, b, bands, min_p)  # pass 3
    info = FewPass(3, len(cand), bands)
    if len(cand) > CAP:
        info.fallback = f"{len(cand)} candidates > {CAP}"
        return None, info
    order = l[cand].argsort(descending=True, stable=True)
    cand = cand[order]
    cl, ce = l[cand], e[cand]
    cband = torch.zeros(len(cand), dtype=torch.long)  # band index = the region above it
    for lo, _hi in bands[1:]:
        cband += (b[cand] >= lo).long()
    try:  # finish
        cut = _top_cut(cl, ce, cband, regions, k, top_p)
        keep_c = (cl >= cut) & (ce >= min_p)
        kept_r = [r.cnt > 0 and r.lo >= cut for r in regions]
        if any(r.cnt and r.lo < cut <= r.hi for r in regions):
            raise _Fail("cut splits a region")
        c, dstar = -math.inf, math.inf
        if typ < 1.0:
            c, dstar = _typical_dstar(cl, ce, keep_c, regions, kept_r, float(m), typ)
            keep_c &= (cl - c).abs() <= dstar
    except _Fail as exc:
        info.fallback = str(exc)
        return None, info
    keep = torch.zeros_like(fin)
    keep[cand] = keep_c
    region_of = torch.zeros_like(b)
    for _lo, hi in bands:
        region_of += (b > hi).long()
    in_band = torch.zeros_like(fin)
    in_band[cand] = True
    for r, kr in enumerate(kept_r):
        if kr:
            sel = fin & ~in_band & (region_of == r) & (e >= min_p)
            if typ < 1.0:
                sel &= (l - c).abs() <= dstar
            keep |= sel
    return keep, info
