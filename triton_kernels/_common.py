"""Shared Triton helpers: the counter-based hash, Exp(1) variates, orderable keys,
and the one helper that sizes every launch.

Kernels never import the rest of decodekit; decodekit.reference mirrors the jit
helpers below in torch (the tests compare them bit for bit).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

C = tl.constexpr  # globals read inside @triton.jit functions must be constexpr

FLT_MAX = C(3.4028234663852886e38)

# Per-slot flag bits (iparams[:, I_FLAGS]); decodekit.sampler sets them.
F_GREEDY = C(1)
F_BIAS = C(2)
F_PENALTY = C(4)
F_SUPPRESS = C(8)
F_BADSEQ = C(16)
F_FILTER = C(32)
F_LOGPROB = C(64)

# Column layout of the packed per-slot parameter tables.
NF = C(8)  # fparams: temperature, top_p, min_p, typical_p, repetition, frequency, presence, -
NI = C(8)  # iparams: top_k, min_new, n_gen, flags, n_hist, logprobs, -, -
F_TEMP, F_TOPP, F_MINP, F_TYP, F_REP, F_FREQ, F_PRES = (C(i) for i in range(7))
I_TOPK, I_MINNEW, I_NGEN, I_FLAGS, I_NHIST, I_NLOGPROB = (C(i) for i in range(6))


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
def exponential(offs, k1, k2):
    """Exp(1) variates (fp32) for token ids ``offs``, keyed by the row keys.

    32 random bits per token; ``-log u`` below 1/2 and ``-log1p(-v)`` (Goldberg's
    form) above, with ``v = 1 - u`` formed exactly, so both tails are precise.
    """
    h = mix32((offs.to(tl.uint32) * 0x9E3779B1) ^ k1)
    r = mix32(h + k2)
    u = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    v = ((0xFFFFFFFF - r).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    w = 1.0 - v
    denom = tl.where(w == 1.0, 1.0, w - 1.0)
    e_high = tl.where(w == 1.0, v, v * tl.log(w) / denom)
    return tl.where(r < 0x80000000, -tl.log(u), e_high)


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


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def launch_shape(n_rows: int, n_cols: int, device: torch.device, block: int) -> tuple[int, int]:
    """Programs per row and columns per program for a row-split launch.

    Aim for about four programs per SM over the whole grid; each program covers
    a whole number of ``block``-wide tiles. Returns ``(programs_per_row, chunk)``.
    """
    tiles = triton.cdiv(n_cols, block)
    want = max(1, triton.cdiv(4 * num_sms(device), max(n_rows, 1)))
    per_row = max(1, min(tiles, want, MAX_CHUNKS))
    tiles_per_prog = triton.cdiv(tiles, per_row)
    per_row = triton.cdiv(tiles, tiles_per_prog)
    return per_row, tiles_per_prog * block


MAX_CHUNKS = 64


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))
