"""Shared Triton helpers: the layout as constexprs, the counter-based hash, Exp(1)
variates, orderable keys, and the commit of one token to a slot's state.

Kernels never import the rest of decodekit; ``decodekit.sampling.reference`` mirrors the
jit helpers below in torch (the tests compare them bit for bit).
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import layout as L

C = tl.constexpr  # globals read inside @triton.jit functions must be constexpr

FLT_MAX = C(L.FLT_MAX)

# Per-slot flag bits (iparams[:, I_FLAGS]).
F_GREEDY = C(L.GREEDY)
F_BIAS = C(L.BIAS)
F_PENALTY = C(L.PENALTY)
F_SUPPRESS = C(L.SUPPRESS)
F_BADSEQ = C(L.BADSEQ)
F_FILTER = C(L.FILTER)
F_LOGPROB = C(L.LOGPROB)

# Column layout of the packed per-slot parameter tables.
NF = C(L.NF)
NI = C(L.NI)
F_TEMP, F_TOPP, F_MINP, F_TYP = C(L.F_TEMP), C(L.F_TOPP), C(L.F_MINP), C(L.F_TYP)
F_REP, F_FREQ, F_PRES = C(L.F_REP), C(L.F_FREQ), C(L.F_PRES)
I_TOPK, I_MINNEW, I_NGEN = C(L.I_TOPK), C(L.I_MINNEW), C(L.I_NGEN)
I_FLAGS, I_NHIST, I_NLOGPROB = C(L.I_FLAGS), C(L.I_NHIST), C(L.I_NLOGPROB)

MAX_CHUNKS = C(L.MAX_CHUNKS)
E_MIN = 1.1641532182693481e-10  # the smallest Exp(1) variate of exponential_bits (r = 2**32 - 1)
E_SKIP = C(E_MIN * 0.999)
KEY_NEG_INF = C(-2139095041)  # float_key(-inf)
KEY_POS_INF = C(2139095040)  # float_key(+inf)
NPART = C(L.NPART)
ACCEPT_LANE = C(L.ACCEPT_LANE)


@triton.jit
def mix32(x):
    """lowbias32 integer hash of uint32 values."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def row_keys(seed, position):
    """Two uint32 keys from an int64 seed and an int32/int64 position (scalars)."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    a = mix32(hi ^ 0x68E31DA4)
    b = mix32(lo ^ a)
    k1 = mix32(b ^ (position.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32))
    k2 = mix32(k1 ^ 0x1B56C4E9)
    return k1, k2


@triton.jit
def token_bits(offs, k1, k2):
    """32 random bits (uint32) per token id ``offs``, keyed by the row keys."""
    h = mix32((offs.to(tl.uint32) * 0x9E3779B1) ^ k1)
    return mix32(h + k2)


@triton.jit
def exponential_bits(r):
    """Exp(1) variates (fp32) from 32 random bits ``r``: ``-log u`` below 1/2 and
    ``-log1p(-v)`` (Goldberg's form) above, with ``v = 1 - u`` formed exactly, so both
    tails are precise. One logarithm per token (the branches share it)."""
    low = r < 0x80000000
    u = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    v = ((0xFFFFFFFF - r).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    w = 1.0 - v
    lg = tl.log(tl.where(low, u, w))
    denom = tl.where(w == 1.0, 1.0, w - 1.0)
    e_high = tl.where(w == 1.0, v, v * lg / denom)
    return tl.where(low, -lg, e_high)


@triton.jit
def exponential(offs, k1, k2):
    """Exp(1) variates (fp32) for token ids ``offs``, keyed by the row keys."""
    return exponential_bits(token_bits(offs, k1, k2))


@triton.jit
def race_keys(w, valid, offs, k1, k2, best):
    """Keys ``w_i / E_i`` of the exponential race for the tokens of a tile that can still
    beat ``best`` (a scalar, or one running best per token), ``-1`` for the others
    (``valid`` false, or certainly not above ``best``).

    Logarithms only where a token can still win. Every variate is at least ``E_MIN`` (the
    smallest ``E`` 32 bits give) and at least ``min(v, 0.69)`` (``-log1p(-v) >= v``;
    ``-log u >= ln 2`` below 1/2), so a token with ``w_i < best * bound_i * 0.999`` has
    ``w_i / E_i < best`` (the 0.1% covers rounding and the fast division) and cannot
    change the result: a tile whose weights are all below ``best * E_MIN * 0.999`` skips
    even the hash, other tiles draw the logarithm only when a token passes. Once ``best``
    has settled (a few tiles in) most tiles skip the logarithm, on peaked and flat rows
    alike; the race's result is the plain race's, bit for bit.
    """
    key = tl.where(valid, -1.0, -1.0)
    if tl.max(tl.where(valid & (w >= best * E_SKIP), 1, 0), axis=0) > 0:
        r = token_bits(offs, k1, k2)
        v = ((0xFFFFFFFF - r).to(tl.float32) + 0.5) * 2.3283064365386963e-10
        cand = valid & (w >= best * (tl.minimum(v, 0.69) * 0.999))
        if tl.max(cand.to(tl.int32), axis=0) > 0:
            key = tl.where(cand, w / exponential_bits(r), -1.0)
    return key


@triton.jit
def race_tile(w, valid, offs, start, k1, k2, best, best_i):
    """One tile of the exponential race ``argmax_i w_i / E_i`` over the ``valid`` tokens
    (``w >= 0``, tile starting at token ``start``): the updated running ``(best key, its
    token)``. A tile takes over only with a key strictly above ``best`` (the first of equal
    keys wins); logarithms only where :func:`race_keys` finds a token that can."""
    key = race_keys(w, valid, offs, k1, k2, best)
    kb = tl.max(key, axis=0)
    take = kb > best
    best_i = tl.where(take, start + tl.argmax(key, axis=0), best_i)
    best = tl.where(take, kb, best)
    return best, best_i


@triton.jit
def float_key(x):
    """Map fp32 to int32 so that integer order equals float order (-0.0 and +0.0 equal)."""
    b = x.to(tl.int32, bitcast=True)
    b = tl.where(b == -2147483648, 0, b)  # -0.0
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def key_float(k):
    """Inverse of :func:`float_key`."""
    b = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def commit_token(slot, tok, flags, iparams_ptr, counts_ptr, hist_ptr, V, H,
                 HAS_PENALTY: tl.constexpr, HAS_HIST: tl.constexpr):
    """Append one token to a slot's state: step counter, penalty counts, bad-word history."""
    gp = iparams_ptr + slot * NI + I_NGEN
    tl.store(gp, tl.load(gp) + 1)
    if HAS_PENALTY:
        if (flags & F_PENALTY) != 0:
            cp = counts_ptr + slot * V + tok
            tl.store(cp, tl.load(cp) + 2)
    if HAS_HIST:
        if (flags & F_BADSEQ) != 0:
            hp = iparams_ptr + slot * NI + I_NHIST
            nh = tl.load(hp)
            tl.store(hist_ptr + slot * H + nh % H, tok.to(tl.int32))
            tl.store(hp, nh + 1)
