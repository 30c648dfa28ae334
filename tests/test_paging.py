"""The paged KV cache: block pool, block tables, prefix caching, copy on write, and the
generator on top of them.

Oracles: a plain per-slot list of what each position should hold (the cache's own content
is checked through its real write and gather paths), transformers' ``generate`` for the
generator's tokens, and the same generator without prefix caching."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from _models import VOCAB, hf_greedy, tiny_model, word_tokenizer

from decodekit import SamplingParams, Steering, SteeringVector, TokenGenerator
from decodekit.engine.blocks import BlockPool, OutOfBlocks, block_keys
from decodekit.engine.kv_cache import PagedKVCache
from decodekit.engine.paging import KVBlocks, range_salts

BS = 4


# ----------------------------------------------------------------------------- pool
def test_pool_counts_parks_and_evicts():
    pool = BlockPool(4)  # blocks 1..3
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert sorted((a, b, c)) == [1, 2, 3] and pool.num_usable == 0
    with pytest.raises(OutOfBlocks):
        pool.allocate()
    assert pool.register(a, b"A") and not pool.register(b, b"A") and not pool.register(a, b"B")
    pool.release(a)  # registered: parked, not freed
    assert (pool.num_free, pool.num_usable, pool.num_cached) == (0, 1, 1)
    assert pool.lookup(b"A") == a and pool.refs(a) == 1 and pool.hits == 1
    pool.release(a)
    pool.release(b)  # unregistered: freed
    assert pool.allocate() == b  # free blocks go before parked ones
    assert pool.allocate() == a and pool.evictions == 1 and pool.lookup(b"A") is None
    with pytest.raises(ValueError, match="not held"):
        pool.release(0)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(1)


def test_pool_writable_copies_shared_and_registered_blocks():
    pool = BlockPool(8)
    a = pool.allocate()
    assert pool.writable(a) == a  # sole holder, unregistered: write in place
    pool.share(a)
    b = pool.writable(a)
    assert b != a and pool.refs(a) == 1 and pool.refs(b) == 1
    pool.register(a, b"k")
    c = pool.writable(a)  # registered content must not change under its key
    assert c not in (a, b) and pool.refs(a) == 0 and pool.lookup(b"k") == a


def test_block_keys_chain_and_salts():
    toks = list(range(10))
    k = block_keys(toks, BS)
    assert len(k) == 2 and len(set(k)) == 2
    assert block_keys(toks[:8], BS) == k  # partial tail ignored
    assert block_keys([99] + toks[1:], BS)[1] != k[1]  # a change earlier changes later keys
    assert block_keys(toks, BS, [b"", b"s"])[0] == k[0] and block_keys(toks, BS, [b"", b"s"])[1] != k[1]
    salts = range_salts(b"tag", 5, 7, 3, BS)  # positions 5, 6: block 1 only
    assert salts[0] == b"" and salts[2] == b"" and salts[1] != b""
    assert range_salts(b"tag", 4, 7, 3, BS)[1] != salts[1]  # a different part of the block


# ----------------------------------------------------------------------------- tables + content
def _cache(slots: int, positions: int, blocks: int) -> PagedKVCache:
    cfg = SimpleNamespace(num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, head_dim=1,
                          hidden_size=1)
    return PagedKVCache(cfg, slots, positions, "cpu", torch.float64, num_blocks=blocks, block_size=BS)


def _value(tokens: list[int]) -> float:
    """What position ``len(tokens) - 1`` holds: a function of every token up to it (as keys
    and values are), exact in float64."""
    return float(hash(tuple(tokens)) % 1_000_003)


def _write(cache: PagedKVCache, slot: int, tokens: list[int], start: int) -> None:
    """The cache's own write path: positions ``start ..`` of ``slot`` get their values."""
    pos = torch.arange(start, len(tokens))[None]
    vals = torch.tensor([_value(tokens[: p + 1]) for p in range(start, len(tokens))], dtype=torch.float64)
    cache.bind(slot, pos, cache.max_seq_len)
    for layer in range(len(cache.layers)):
        kv = (vals + layer)[None, None, :, None]  # [1, H, q, D]
        cache.update(kv, -kv, layer)


def _read(cache: PagedKVCache, slot: int, n: int) -> list[float]:
    """The gather path: what attention would see for ``slot``'s first ``n`` positions."""
    cache.bind(slot, torch.tensor([[cache.max_seq_len - 1]]), n)
    out = []
    for layer in range(len(cache.layers)):
        k, v = cache._gather(cache.layers[layer].keys), cache._gather(cache.layers[layer].values)
        assert torch.equal(k, -v)
        out.append((k[0, 0, :, 0] - layer).tolist())
    assert out[0] == out[1]
    return out[0]


def test_random_admissions_forks_and_releases_keep_every_slot_intact():
    """A few hundred random admissions (with shared prefixes), decode writes, forks and
    releases: every slot always reads back exactly its own tokens' values; no block ever has
    two writers; when every slot is released nothing is held and every block is usable."""
    rng = random.Random(0)
    slots, positions = 6, 40
    cache = _cache(slots, positions, blocks=40)
    kv = KVBlocks(cache)
    pool = kv.pool
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    tokens: dict[int, list[int]] = {}
    for _ in range(400):
        op = rng.random()
        free = [s for s in range(slots) if s not in tokens]
        if op < 0.3 and free:
            s = rng.choice(free)
            t = rng.choice(prefixes)[:] + [rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))]
            try:
                cached = kv.admit(s, t)
            except OutOfBlocks:
                assert kv.blocks(s) == []
                continue
            assert cached % BS == 0 and cached < len(t)
            kv.sync()
            _write(cache, s, t, cached)
            kv.register(s, t)
            tokens[s] = t
        elif op < 0.45 and free and tokens:
            parent, child = rng.choice(list(tokens)), rng.choice(free)
            kv.fork(parent, child)
            tokens[child] = list(tokens[parent])
        elif op < 0.8 and tokens:
            s = rng.choice(list(tokens))
            t = tokens[s]
            n = rng.randrange(1, 4)
            if len(t) + n > positions:
                continue
            try:
                kv.prepare(s, len(t), len(t) + n)
            except OutOfBlocks:
                continue
            kv.sync()
            for i in range(len(t) // BS, kv.blocks_for(len(t) + n)):  # one writer per written block
                b = kv.blocks(s)[i]
                assert pool.refs(b) == 1 and pool.key(b) is None
            t += [rng.randrange(3, 50) for _ in range(n)]
            _write(cache, s, t, len(t) - n)
        elif tokens:
            s = rng.choice(list(tokens))
            kv.free(s)
            del tokens[s]
        kv.sync()
        for s, t in tokens.items():
            assert _read(cache, s, len(t)) == [_value(t[: p + 1]) for p in range(len(t))], s
        held = [b for s in tokens for b in kv.blocks(s)]
        assert all(pool.refs(b) == held.count(b) for b in set(held))
        assert pool.num_usable + len(set(held)) == pool.num_blocks - 1
    for s in list(tokens):
        kv.free(s)
    assert pool.num_usable == pool.num_blocks - 1 and pool.hits > 0 and kv.stats.copied_blocks > 0
    kv.sync()
    assert int(cache.block_tables.abs().sum()) == 0  # every table row back to the null block


# ----------------------------------------------------------------------------- generator
def _gen(**kw) -> TokenGenerator:
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("max_seq_len", 96)
    return TokenGenerator(tiny_model(kw.pop("arch", "llama")), word_tokenizer(), **kw)


def _run(gen: TokenGenerator, prompt: list[int], n: int, steering=None, rid="r") -> tuple[list[int], object]:
    ctx = gen.new_context(prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True), rid,
                          steering=steering)
    first = None
    while not ctx.is_done:
        gen.next_token({rid: ctx})
        first = first or gen.stats
    gen.release(ctx)
    return ctx.generated_token_ids, first


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefix_hit_prefills_only_the_tail(arch):
    rng = random.Random(arch)
    prompt = [rng.randrange(3, VOCAB) for _ in range(3 * 16 + 5)]  # 3 full blocks + 5
    gen = _gen(arch=arch)
    a, s1 = _run(gen, prompt, 12, rid="a")
    b, s2 = _run(gen, prompt, 12, rid="b")
    assert (s1.prefill_tokens, s1.prefix_hit_tokens) == (53, 0)
    assert (s2.prefill_tokens, s2.prefix_hit_tokens) == (5, 48)
    assert a == b == hf_greedy(tiny_model(arch), prompt, 12)
    other = prompt[:20] + [(prompt[20] + 1 - 3) % (VOCAB - 3) + 3] + prompt[21:]  # differs in block 1
    c, s3 = _run(gen, other, 12, rid="c")
    assert s3.prefix_hit_tokens == 16 and c == hf_greedy(tiny_model(arch), other, 12)
    assert gen.kv_stats.prefix_hit_tokens == 64
    off = _gen(arch=arch, prefix_caching=False)
    _run(off, prompt, 12, rid="a")
    d, s4 = _run(off, prompt, 12, rid="b")
    assert s4.prefix_hit_tokens == 0 and s4.prefill_tokens == 53 and d == a


def test_steering_of_shared_positions_misses_the_cache():
    torch.manual_seed(0)
    vec = SteeringVector({0: torch.randn(64), 1: torch.randn(64)})
    rng = random.Random(1)
    prompt = [rng.randrange(3, VOCAB) for _ in range(40)]  # blocks 0, 1 full
    gen = _gen()
    plain, _ = _run(gen, prompt, 8, rid="p")
    steer = Steering(vec, 2.0, positions=slice(20, None))  # changes block 1, not block 0
    s1, st = _run(gen, prompt, 8, steering=steer, rid="s")
    assert st.prefix_hit_tokens == 16 and s1 != plain
    s2, st2 = _run(gen, prompt, 8, steering=steer, rid="s2")
    assert st2.prefix_hit_tokens == 32 and s2 == s1  # the same steering hits
    s3, st3 = _run(gen, prompt, 8, steering=Steering(vec, 3.0, positions=slice(20, None)), rid="s3")
    assert st3.prefix_hit_tokens == 16  # another strength misses block 1
    ref = _gen(prefix_caching=False)
    assert _run(ref, prompt, 8, steering=steer, rid="x")[0] == s1
    late = Steering(vec, 2.0, positions="generated")  # prompt positions untouched: full hit
    assert _run(gen, prompt, 8, steering=late, rid="g")[1].prefix_hit_tokens == 32


def test_paged_and_slot_caches_agree_with_speculation_and_joins():
    from decodekit import NGramDraft

    rng = random.Random(3)
    prompts = [[rng.randrange(3, 40) for _ in range(n)] for n in (30, 7, 19, 45)]
    outs = {}
    for kind in ("paged", "slots"):
        gen = _gen(kv_cache=kind, draft=NGramDraft(n=1, k=4), adaptive_k=False, max_batch_size=2)
        got, params = [], SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)
        for i in range(0, 4, 2):  # two at a time, the second pair reuses the slots
            ctxs = {f"{i + j}": gen.new_context(prompts[i + j], params, f"{i + j}") for j in range(2)}
            while not all(c.is_done for c in ctxs.values()):
                gen.next_token({k: c for k, c in ctxs.items() if not c.is_done})
            got += [c.generated_token_ids for c in ctxs.values()]
            for c in ctxs.values():
                gen.release(c)
        outs[kind] = got
        assert gen.spec_stats.accepted > 0
    assert outs["paged"] == outs["slots"]
    assert outs["paged"] == [hf_greedy(tiny_model("llama"), p, 20) for p in prompts]


def test_small_kv_budget_refuses_clearly_and_keeps_others_intact():
    gen = _gen(max_batch_size=3, max_seq_len=32, kv_cache_tokens=64)  # 4 blocks of 16
    rng = random.Random(5)
    p1, p2 = [rng.randrange(3, VOCAB) for _ in range(30)], [rng.randrange(3, VOCAB) for _ in range(40)]
    a = gen.new_context(p1, SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True), "a")
    gen.next_token({"a": a})
    b = gen.new_context(p2[:30], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True), "b")
    c = gen.new_context(p2[:20], SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True), "c")
    with pytest.raises(RuntimeError, match="KV cache has no room"):
        gen.next_token({"a": a, "b": b, "c": c})
    assert b.slot is None and c.slot is None and a.slot is not None
    gen.next_token({"a": a})
    assert a.generated_token_ids == hf_greedy(tiny_model("llama"), p1, 2)


@pytest.mark.parametrize("kw, field", [
    (dict(kv_cache="blocks"), "kv_cache"),
    (dict(block_size=0), "block_size"),
    (dict(kv_cache_tokens=10), "kv_cache_tokens"),
    (dict(prefix_caching="yes"), "prefix_caching"),
])
def test_cache_settings_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        _gen(**kw)
