"""The LoRA kernels (:mod:`decodekit.kernels.lora`) against the torch reference
(:mod:`decodekit.lora.reference`), on the kernel device (the Triton interpreter on CPU, the GPU
in ``make gpu-check``): mixed adapters, ranks, segment lengths and dtypes; rows without an
adapter untouched. No peft here, so the GPU image (which lacks it) runs this file."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE

from decodekit.lora import lora_add, lora_delta


# -- kernels against the reference --------------------------------------------------------------
def _tables(L: int, R: int, K: int, N: int, dtype, seed: int, ranks=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(L + 1, R, K)
    B = torch.zeros(L + 1, N, R)
    scale = torch.zeros(L + 1)
    for l in range(1, L + 1):
        r = (ranks or {}).get(l, R)  # a smaller rank: zero padded, as LoRATables stores it
        A[l, :r] = torch.randn(r, K, generator=g) / K ** 0.5
        B[l, :, :r] = torch.randn(N, r, generator=g) * 0.5
        scale[l] = 0.5 + l / 4
    return A.to(dtype), B.to(dtype), scale


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=1e-3),
       torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
CASES = {  # S segments of Q tokens, K in, N out, R rank, L adapters, slots
    "decode": (6, 1, 40, 24, 8, 3, [1, 0, 3, 1, 2, 1]),
    "decode_many": (40, 1, 32, 20, 4, 2, None),
    "prefill": (3, 37, 33, 70, 16, 2, [2, 0, 2]),
    "window": (5, 4, 64, 48, 20, 4, [4, 4, 0, 1, 3]),
    "all_none": (3, 2, 16, 16, 8, 2, [0, 0, 0]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case, dtype):
    from decodekit.kernels.lora import SlotGroups, lora_add_

    S, Q, K, N, R, L, slots = CASES[case]
    A, B, scale = _tables(L, R, K, N, dtype, seed=S, ranks={1: max(1, R // 2)})
    g = torch.Generator().manual_seed(Q)
    seg = torch.tensor(slots) if slots else torch.randint(0, L + 1, (S,), generator=g)
    x = torch.randn(S, Q, K, generator=g).to(dtype)
    y = torch.randn(S, Q, N, generator=g).to(dtype)
    idx = seg.repeat_interleave(Q)
    want = lora_add(y.reshape(S * Q, N), x.reshape(S * Q, K), A, B, scale, idx).view_as(y)
    dev = KERNEL_DEVICE
    groups = SlotGroups(S + 3, L + 1, dev)
    got = y.clone().to(dev)
    lora_add_(got, x.to(dev), A.to(dev), B.to(dev), scale.to(dev), *groups.fill(seg.to(dev)))
    got = got.cpu()
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(got[seg == 0], y[seg == 0])  # untouched, bit for bit
    if (seg != 0).any():
        assert not torch.equal(got[seg != 0], y[seg != 0])


@pytest.mark.parametrize("R", [64, 100, 256])
def test_kernels_wide_ranks(R):
    from decodekit.kernels.lora import group_by_slot, lora_add_

    S, Q, K, N, L = 4, 9, 48, 40, 2
    A, B, scale = _tables(L, R, K, N, torch.float32, seed=R)
    seg = torch.tensor([1, 2, 0, 1])
    x, y = torch.randn(S, Q, K), torch.randn(S, Q, N)
    want = lora_add(y.reshape(-1, N), x.reshape(-1, K), A, B, scale, seg.repeat_interleave(Q)).view_as(y)
    dev = KERNEL_DEVICE
    got = y.clone().to(dev)
    lora_add_(got, x.to(dev), A.to(dev), B.to(dev), scale.to(dev), *group_by_slot(seg.to(dev), L + 1))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_slot_groups_sort_segments_by_slot():
    from decodekit.kernels.lora import group_by_slot

    seg = torch.tensor([2, 0, 2, 1, 0, 2])
    order, counts, ends = group_by_slot(seg, 4)
    assert order.tolist() == [1, 4, 3, 0, 2, 5]
    assert counts.tolist() == [2, 1, 3, 0] and ends.tolist() == [2, 3, 6, 6]


def test_reference_delta_is_the_peft_formula():
    A, B, scale = _tables(2, 4, 6, 5, torch.float32, seed=0)
    x = torch.randn(3, 6)
    idx = torch.tensor([2, 0, 1])
    d = lora_delta(x, A, B, scale, idx)
    for t, l in enumerate(idx.tolist()):
        torch.testing.assert_close(d[t], scale[l] * (B[l] @ (A[l] @ x[t])))
    assert torch.equal(d[1], torch.zeros(5))


def test_every_tile_choice_is_compiled_ahead_of_time():
    from decodekit.kernels import lora

    compiled = {(name, cfg["BLOCK_T"], cfg["BLOCK_R"]) for name, _, _, cfg, _ in lora.aot_configs()}
    for T in (1, 16, 17, 100, 256, 257, 5000):
        for R in (1, 8, 16, 17, 33, 64, 65, 128, 129, 256):
            bt, br, _, _ = lora.tiles(T, R)
            assert ("lora_shrink", bt, br) in compiled and ("lora_expand", bt, br) in compiled, (T, R)


def test_reference_dense_path_equals_the_per_adapter_loop():
    """Many adapters in a batch (the CPU serving case): the dense products over every slot,
    with ``Bt`` laid out as the tables keep it, give the per-adapter loop's result."""
    from decodekit.lora.reference import DENSE_FROM

    L, R, K, N, T = 9, 8, 40, 24, 30
    A, B, scale = _tables(L, R, K, N, torch.float32, seed=7, ranks={2: 3})
    Bt = B.transpose(1, 2).reshape((L + 1) * R, N).contiguous()
    idx = torch.arange(T) % (L + 1)  # every slot, 0 included
    assert len(set(idx.tolist()) - {0}) > DENSE_FROM
    x, y = torch.randn(T, K), torch.randn(T, N)
    loop, dense = lora_delta(x, A, B, scale, idx), lora_delta(x, A, B, scale, idx, Bt)
    torch.testing.assert_close(dense, loop, atol=1e-5, rtol=1e-5)
    assert torch.equal(dense[idx == 0], torch.zeros(int((idx == 0).sum()), N))
    out = lora_add(y, x, A, B, scale, idx, Bt)
    assert torch.equal(out[idx == 0], y[idx == 0])


@pytest.mark.parametrize("dense", [False, True])
def test_reference_reduce_sums_row_wise_shards(dense):
    """A row-wise TP layer on two ranks, simulated in one process: each rank's ``x`` and ``A``
    hold half of the input features and ``reduce`` adds the other rank's shrink; the delta is
    the whole layer's (per-adapter loop and dense paths). Negative control: without the
    reduce, one half's delta is not it."""
    L, R, K, N, T = 6, 4, 40, 24, 18
    A, B, scale = _tables(L, R, K, N, torch.float32, seed=3)
    Bt = B.transpose(1, 2).reshape((L + 1) * R, N).contiguous() if dense else None
    idx = torch.arange(T) % (L + 1) if dense else torch.tensor([0, 2, 5, 2] * 4 + [0, 5])
    x = torch.randn(T, K)
    whole = lora_delta(x, A, B, scale, idx, Bt)
    half = [(x[:, s].contiguous(), A[:, :, s].contiguous()) for s in (slice(0, K // 2), slice(K // 2, K))]
    other: list[torch.Tensor] = []
    lora_delta(half[1][0], half[1][1], B, scale, idx, Bt, reduce=lambda h: other.append(h.clone()))
    got = lora_delta(half[0][0], half[0][1], B, scale, idx, Bt, reduce=lambda h: h.add_(other[0]))
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    alone = lora_delta(half[0][0], half[0][1], B, scale, idx, Bt)
    assert (alone - whole).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_adapter_fast_path_equals_the_general_reference(dtype):
    """``lora_add_one`` (every token one adapter) gives ``lora_add``'s result for that slot, with
    and without a reduce (here: doubling the shrink, as two identical ranks would)."""
    from decodekit.lora import lora_add_one

    L, R, K, N, T = 3, 8, 32, 20, 5
    A, B, scale = _tables(L, R, K, N, dtype, seed=4)
    x, y = torch.randn(T, K).to(dtype), torch.randn(T, N).to(dtype)
    idx = torch.full((T,), 2)
    want = lora_add(y, x, A, B, scale, idx)
    got = lora_add_one(y, x, A[2], B[2].T, float(scale[2]))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    doubled = lora_add_one(y, x, A[2], B[2].T, float(scale[2]), reduce=lambda h: h.mul_(2))
    torch.testing.assert_close(doubled.float() - y.float(), 2 * (want.float() - y.float()), atol=2 * tol,
                               rtol=2 * tol)
    with pytest.raises(ValueError, match="do not fit"):
        lora_add_one(y, x, A[2], B[2], float(scale[2]))
