"""Paged attention: the Triton kernel (interpreter on CPU) against the torch reference, and the
reference against torch's own scaled_dot_product_attention over the gathered cache (the math
the models run today), for decode (one query) and windows (several), GQA groups, sliding
windows, soft-capping, lengths of 1..4 blocks plus odd remainders, splits, and padding rows."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import KERNEL_DEVICE

from decodekit.engine.attention import paged_attention, paged_attention_reference

BS = 16


def _case(B: int, H: int, KVH: int, Q: int, D: int, lens: list[int], seed: int, dtype=torch.float32):
    """A random cache whose rows hold their blocks in shuffled order, and queries at the end of
    each row (a window of Q: positions len - Q .. len - 1)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // BS) for n in lens) + 1
    blocks = B * width + 1
    k = torch.randn(blocks, BS, KVH, D, generator=g).to(dtype)
    v = torch.randn(blocks, BS, KVH, D, generator=g).to(dtype)
    ids = list(range(1, blocks))
    random.Random(seed).shuffle(ids)
    tables = torch.tensor([ids[b * width:(b + 1) * width] for b in range(B)], dtype=torch.long)
    q = torch.randn(B, H, Q, D, generator=g).to(dtype)
    seq = torch.tensor(lens, dtype=torch.long)
    q_pos = (seq[:, None] - Q + torch.arange(Q)).clamp(min=0)
    return q, k, v, tables, seq, q_pos


CASES = [  # (B, H, KVH, Q, D, lens)
    (3, 4, 4, 1, 64, [1, 16, 37]),  # MHA decode, 1 block / exactly 1 / 2 + remainder
    (2, 8, 2, 1, 64, [64, 50]),  # GQA 4, 4 blocks / 3 + 2
    (2, 6, 2, 5, 32, [21, 40]),  # GQA 3 (not a power of two), a window of 5
    (1, 4, 1, 17, 64, [60]),  # MQA, a speculative window of 17
    (2, 2, 2, 40, 16, [40, 55]),  # a prefill chunk: 40 queries, two query tiles
    (2, 4, 2, 3, 24, [33, 17]),  # head_dim 24: a 32-wide tile with masked columns
]


@pytest.mark.parametrize("softcap, window", [(0.0, 0), (30.0, 0), (0.0, 9), (50.0, 7)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}kv{c[2]}Q{c[3]}D{c[4]}")
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_reference(case, softcap, window, splits):
    B, H, KVH, Q, D, lens = case
    q, k, v, tables, seq, q_pos = _case(B, H, KVH, Q, D, lens, seed=B * 100 + Q)
    ref = paged_attention_reference(q, k, v, tables, seq, q_pos, D ** -0.5, softcap, window)
    from decodekit.kernels.paged_attention import paged_attention as kernel

    dev = KERNEL_DEVICE
    got = kernel(q.to(dev), k.to(dev), v.to(dev), tables.to(dev), seq.to(dev), q_pos.to(dev), D ** -0.5,
                 softcap, window, splits=splits).cpu()
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


def test_padding_rows_give_zeros_and_bf16_is_close():
    q, k, v, tables, seq, q_pos = _case(3, 4, 2, 1, 64, [30, 1, 20], seed=5, dtype=torch.bfloat16)
    seq[1] = 0  # a padding row: nothing visible
    from decodekit.kernels.paged_attention import paged_attention as kernel

    dev = KERNEL_DEVICE
    got = kernel(q.to(dev), k.to(dev), v.to(dev), tables.to(dev), seq.to(dev), q_pos.to(dev), 0.125,
                 splits=2).cpu()
    ref = paged_attention_reference(q, k, v, tables, seq, q_pos, 0.125)
    assert got.dtype == torch.bfloat16 and bool((got[1] == 0).all())
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [0, 9])
def test_reference_matches_torch_sdpa_over_the_gathered_cache(window):
    B, H, KVH, Q, D = 2, 8, 2, 5, 32
    q, k, v, tables, seq, q_pos = _case(B, H, KVH, Q, D, [37, 20], seed=9)
    n = tables.shape[1] * BS
    kk = k[tables].reshape(B, n, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
    vv = v[tables].reshape(B, n, KVH, D).transpose(1, 2).repeat_interleave(H // KVH, 1)
    p = torch.arange(n)
    ok = (p < seq[:, None, None, None]) & (p <= q_pos[:, None, :, None])
    if window:
        ok &= p > q_pos[:, None, :, None] - window
    want = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=ok)
    got = paged_attention_reference(q, k, v, tables, seq, q_pos, D ** -0.5, window=window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dispatch_and_validation():
    q, k, v, tables, seq, q_pos = _case(1, 2, 1, 1, 16, [5], seed=1)
    a = paged_attention(q, k, v, tables, seq, q_pos, 0.25)  # CPU: the reference
    torch.testing.assert_close(a, paged_attention_reference(q, k, v, tables, seq, q_pos, 0.25))
    with pytest.raises(ValueError, match="backend"):
        paged_attention(q, k, v, tables, seq, q_pos, 0.25, backend="cuda")
    from decodekit.kernels.paged_attention import paged_attention as kernel

    with pytest.raises(ValueError, match="block_size"):
        kernel(q, k[:, :8], v[:, :8], tables, seq, q_pos, 0.25)
    with pytest.raises(ValueError, match="does not fit"):
        kernel(q[:, :, :, :8], k, v, tables, seq, q_pos, 0.25)


# ----------------------------------------------------------------------------- in the generator
@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3"])
def test_generator_with_the_attention_kernel_matches_hf(arch, one_thread):
    """The model's layers call the kernel (interpreter on CPU) through transformers' attention
    interface: greedy tokens equal transformers' with joins, slot reuse, a prefix hit and
    (llama) speculative windows; gemma2 has sliding windows (8) and soft-capping."""
    from _models import VOCAB, hf_greedy, tiny_model, word_tokenizer

    from decodekit import NGramDraft, SamplingParams, TokenGenerator

    model = tiny_model(arch)
    draft = NGramDraft(n=1, k=3) if arch == "llama" else None
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, attention="triton",
                         draft=draft, adaptive_k=False)
    assert gen.runner.cache.kernel_attention
    rng = random.Random(arch)
    shared = [rng.randrange(3, 40) for _ in range(20)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(n)] for n in (3, 9, 5)]
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)
    ctxs = [gen.new_context(p, params, str(i)) for i, p in enumerate(prompts)]
    batch, waiting, hits = {c.request_id: c for c in ctxs[:2]}, ctxs[2:], 0
    while batch:
        for rid, r in gen.next_token(batch).items():
            if r.is_done:
                gen.release(batch.pop(rid))
                if waiting:  # the third reuses a slot and the shared prefix's cached block
                    nxt = waiting.pop()
                    batch[nxt.request_id] = nxt
        hits += gen.stats.prefix_hit_tokens
    assert hits == 16
    assert [c.generated_token_ids for c in ctxs] == [hf_greedy(model, p, 10) for p in prompts]
    assert model.config._attn_implementation != "decodekit_paged"  # restored after each forward


def test_attention_setting_is_validated():
    from _models import tiny_model, word_tokenizer

    from decodekit import TokenGenerator

    for kw, field in ((dict(attention="flash"), "attention"), (dict(attention="triton", kv_cache="slots"),
                                                               "kv_cache"),
                      (dict(attention="triton", block_size=8), "block_size")):
        with pytest.raises(ValueError, match=field):
            TokenGenerator(tiny_model("llama"), word_tokenizer(), **kw)


def test_a_kernel_that_disagrees_is_refused_with_a_warning(monkeypatch):
    """The construction-time self-test catches a kernel path that gives wrong attention (here
    a broken kernel): a warning, the gather path instead, and still transformers' tokens."""
    from _models import hf_greedy, tiny_model, word_tokenizer

    import decodekit.engine.attention as attention
    from decodekit import SamplingParams, TokenGenerator

    monkeypatch.setattr(attention, "paged_attention", lambda q, *a, **k: torch.zeros_like(q))
    with pytest.warns(RuntimeWarning, match="paged attention kernel unusable"):
        gen = TokenGenerator(tiny_model("llama"), word_tokenizer(), max_batch_size=1, max_seq_len=32,
                             attention="triton")
    assert not gen.runner.cache.kernel_attention
    ctx = gen.new_context([5, 6, 7, 8], SamplingParams(temperature=0, max_new_tokens=5, ignore_eos=True))
    while not ctx.is_done:
        gen.next_token({ctx.request_id: ctx})
    assert ctx.generated_token_ids == hf_greedy(tiny_model("llama"), [5, 6, 7, 8], 5)
