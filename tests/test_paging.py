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


def _read(cache: PagedKVCache, slot: int, n: int, home: bool = False) -> list[float]:
    """The gather path (``home``: the view of the slot's home range): what attention would
    see for ``slot``'s first ``n`` positions."""
    cache.bind(slot, torch.tensor([[cache.max_seq_len - 1]]), n, home=home)
    out = []
    for layer in range(len(cache.layers)):
        k, v = cache._gather(cache.layers[layer].keys, 0), cache._gather(cache.layers[layer].values, 1)
        assert torch.equal(k, -v)
        out.append((k[0, 0, :, 0] - layer).tolist())
    assert out[0] == out[1]
    return out[0]


@pytest.mark.parametrize("blocks, home_copies", [(40, False), (61, False), (61, True)])
def test_random_admissions_forks_and_releases_keep_every_slot_intact(blocks, home_copies):
    """A few hundred random admissions (with shared prefixes), decode writes, forks and
    releases: every slot always reads back exactly its own tokens' values; no block ever has
    two writers; when every slot is released nothing is held and every block is usable.
    With 61 blocks every slot has a home range (1 + 6 slots x 10 blocks): fresh blocks come
    from it (cached content parked there moves out first), and a slot holding only home
    blocks reads the same values through the strided view as through the gather;
    ``home_copies``: prefix hits are copied into the home blocks instead of shared."""
    rng = random.Random(0)
    slots, positions = 6, 40
    cache = _cache(slots, positions, blocks=blocks)
    kv = KVBlocks(cache, home_copies=home_copies)
    pool = kv.pool
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    tokens: dict[int, list[int]] = {}
    home_reads = 0
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
            want = [_value(t[: p + 1]) for p in range(len(t))]
            assert _read(cache, s, len(t)) == want, s
            if kv.home_rows(s, 1):
                assert kv.blocks(s) == [cache.home_block(s, i) for i in range(len(kv.blocks(s)))]
                assert _read(cache, s, len(t), home=True) == want, s
                home_reads += 1
        held = [b for s in tokens for b in kv.blocks(s)]
        assert all(pool.refs(b) == held.count(b) for b in set(held))
        assert pool.num_usable + len(set(held)) == pool.num_blocks - 1
    for s in list(tokens):
        kv.free(s)
    assert pool.num_usable == pool.num_blocks - 1 and pool.hits > 0 and kv.stats.copied_blocks > 0
    if blocks == 61:
        assert home_reads > (150 if home_copies else 30) and kv.stats.moved_blocks > 0, (home_reads, kv.stats)
    else:
        assert home_reads == 0 and cache.home_block(0, 0) is None
    kv.sync()
    assert int(cache.block_tables.abs().sum()) == 0  # every table row back to the null block


def test_cached_content_moved_twice_in_one_sync_keeps_its_values():
    """Slot 2's cached prompt blocks are parked in its home range when it takes that range
    again: block 21's content moves to block 23 (the freed partial block, the next free
    one), and then slot 2's third block is 23 itself, so that content moves a second time in
    the same sync. The copies must run in order (one batched copy would read 23 before the
    first copy wrote it). A later prefix hit reads the original values."""
    cache = _cache(6, 40, blocks=61)
    kv = KVBlocks(cache)
    t = list(range(10, 19))  # two full blocks and one token
    kv.admit(2, t)
    kv.sync()
    assert kv.blocks(2) == [21, 22, 23]  # slot 2's home range
    _write(cache, 2, t, 0)
    kv.register(2, t)
    kv.free(2)  # 21, 22 parked under t's keys; 23 (not full) freed
    kv.sync()
    kv.admit(2, list(range(40, 49)))  # 21 -> 23, 22 -> 1, then 23 (holding 21's content) -> 2
    assert kv.blocks(2) == [21, 22, 23] and kv.stats.moved_blocks == 3
    kv.sync()
    assert kv.admit(4, t) == 8  # both full blocks from the cache
    kv.sync()
    assert _read(cache, 4, 8) == [_value(t[: p + 1]) for p in range(8)]


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


def _through_scheduler(gen: TokenGenerator, prompts: list[list[int]], params: list[SamplingParams]):
    from decodekit.engine.scheduler import continuous_batching

    ctxs = [gen.new_context(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    preempted = sum(gen.stats.preempted for _ in continuous_batching(gen, ctxs))
    assert all(c.is_done for c in ctxs)
    return ctxs, preempted


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_preempted_requests_reprefill_and_continue_exactly(draft):
    """A budget of 6 blocks for 3 slots of up to 4 blocks: the youngest request is preempted
    and re-prefilled, again and again. Greedy tokens equal transformers'; seeded sampled
    tokens with penalties equal an unconstrained generator's (the sampler's counters and
    penalty counts are brought forward over the generated tokens)."""
    from decodekit import NGramDraft

    rng = random.Random(7)
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randrange(12, 24))] for _ in range(6)]
    kw = dict(max_batch_size=3, max_seq_len=64, seed=0, draft=NGramDraft(n=1, k=3) if draft else None,
              adaptive_k=False)
    small = _gen(kv_cache_tokens=96 + (2 * 16 if draft else 0), **kw)
    greedy = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)] * 6
    ctxs, preempted = _through_scheduler(small, prompts, greedy)
    assert preempted > 0 and sum(c.preemptions for c in ctxs) == preempted
    assert [c.generated_token_ids for c in ctxs] == [hf_greedy(tiny_model("llama"), p, 30) for p in prompts]
    sampled = [SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.3, max_new_tokens=30,
                              ignore_eos=True, seed=100 + i) for i in range(6)]
    got, preempted = _through_scheduler(small, prompts, sampled)
    want, none = _through_scheduler(_gen(**kw), prompts, sampled)
    assert preempted > 0 and none == 0
    assert [c.generated_token_ids for c in got] == [c.generated_token_ids for c in want]
    assert small.runner.kv.num_usable == small.runner.kv.pool.num_blocks - 1  # nothing leaked


def test_a_request_without_room_waits_and_others_are_untouched():
    gen = _gen(max_batch_size=3, max_seq_len=48, kv_cache_tokens=64)  # 4 blocks of 16
    rng = random.Random(5)
    p1, p2 = [rng.randrange(3, VOCAB) for _ in range(30)], [rng.randrange(3, VOCAB) for _ in range(40)]
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    a = gen.new_context(p1, params, "a")
    gen.next_token({"a": a})
    b, c = gen.new_context(p2[:35], params, "b"), gen.new_context(p2[:20], params, "c")
    out = gen.next_token({"a": a, "b": b, "c": c})  # b needs 3 blocks, 2 are left; c queues behind
    assert out["b"].tokens == [] and out["c"].tokens == [] and gen.stats.waiting == 2
    assert b.slot is None and c.slot is None and a.is_done and b.preemptions == 0
    d = gen.new_context(p2[:5], params, "d")
    gen.next_token({"a": a, "b": b, "c": c, "d": d})  # d queues behind b and c
    gen.release("d")  # by id, without a slot: cancelled, nothing else touched
    assert d.status.name == "CANCELLED" and d.slot is None
    assert a.generated_token_ids == hf_greedy(tiny_model("llama"), p1, 2)
    gen.release(a)
    while not (b.is_done and c.is_done):
        gen.next_token({k: x for k, x in (("b", b), ("c", c)) if not x.is_done})
    assert b.generated_token_ids == hf_greedy(tiny_model("llama"), p2[:35], 2)
    assert c.generated_token_ids == hf_greedy(tiny_model("llama"), p2[:20], 2)


@pytest.mark.parametrize("kw, field", [
    (dict(kv_cache="blocks"), "kv_cache"),
    (dict(block_size=0), "block_size"),
    (dict(kv_cache_tokens=10), "kv_cache_tokens"),
    (dict(prefix_caching="yes"), "prefix_caching"),
])
def test_cache_settings_are_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        _gen(**kw)


# ----------------------------------------------------------------------------- forks
def _hf_logprobs(model, tokens: list[int], n_prompt: int) -> list[float]:
    """Cache-free oracle: the raw log probability of each generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[p - 1, tokens[p]].item() for p in range(n_prompt, len(tokens))]


def _finish(gen: TokenGenerator, ctxs: list) -> None:
    while not all(c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done})


def _sampled(seed: int | None, n: int = 14) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=50, max_new_tokens=n, ignore_eos=True, seed=seed, logprobs=0)


@pytest.mark.parametrize("seeded, num_steps, kv_cache", [(True, 1, "paged"), (False, 1, "paged"),
                                                        (True, 4, "paged"), (True, 4, "slots")])
def test_fork_before_prefill_equals_independent_seeded_requests(seeded, num_steps, kv_cache):
    model = tiny_model("llama")
    rng = random.Random(11)
    prompt = [rng.randrange(3, VOCAB) for _ in range(37)]  # 2 full blocks + 5
    gen = _gen(max_batch_size=5, seed=3, kv_cache=kv_cache)
    parent = gen.new_context(prompt, _sampled(50 if seeded else None), "p")
    kids = gen.fork(parent, 2) + gen.fork(parent, 1)  # a second fork goes on numbering
    grandkid = gen.fork(kids[0], 1)[0]  # a fork of a fork: another sample of the same prompt
    assert [k.seed for k in [*kids, grandkid]] == [parent.seed + i for i in (1, 2, 3, 4)]
    family = [parent, *kids, grandkid]
    gen.next_token({c.request_id: c for c in family}, num_steps=num_steps)
    assert gen.stats.prefill_tokens == 37  # one prefill for the five
    assert len(parent.generated_token_ids) == num_steps and all(len(c.generated_token_ids) == 1
                                                                 for c in family[1:])
    if kv_cache == "paged":
        assert gen.kv_stats.copied_blocks == 0
    _finish(gen, family)
    if kv_cache == "paged":
        assert gen.kv_stats.copied_blocks == 4  # the shared partial block: every writer but the last copies
    solo = _gen(max_batch_size=1, prefix_caching=False)
    for c in family:
        ref = solo.new_context(prompt, _sampled(c.seed), "solo")
        _finish(solo, [ref])
        solo.release(ref)
        assert c.generated_token_ids == ref.generated_token_ids
    assert len({tuple(c.generated_token_ids) for c in family}) > 1  # the seeds differ (not all one run)
    for c in family:
        got = [x for lp in c.logprobs for x in lp.token_log_probabilities]
        torch.testing.assert_close(got, _hf_logprobs(model, c.tokens, 37), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_cache", ["paged", "slots"])
def test_fork_of_a_running_request_branches_from_its_state(kv_cache):
    model = tiny_model("llama")
    rng = random.Random(12)
    prompt = [rng.randrange(3, VOCAB) for _ in range(21)]
    gen = _gen(max_batch_size=3, kv_cache=kv_cache)
    parent = gen.new_context(prompt, _sampled(7, n=20), "p")
    gen.next_token({"p": parent}, num_steps=6)
    kids = gen.fork(parent, 2)
    assert all(k.generated_token_ids == parent.generated_token_ids and k.slot is not None for k in kids)
    assert kids[0].text == parent.text
    _finish(gen, [parent, *kids])
    head = parent.generated_token_ids[:6]
    assert all(c.generated_token_ids[:6] == head and len(c.generated_token_ids) == 20
               for c in (parent, *kids))
    assert len({tuple(c.generated_token_ids) for c in (parent, *kids)}) > 1
    for c in (parent, *kids):
        got = [x for lp in c.logprobs for x in lp.token_log_probabilities]
        torch.testing.assert_close(got, _hf_logprobs(model, c.tokens, 21), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="not ACTIVE"):
        gen.fork(parent, 1)
    with pytest.raises(ValueError, match="n"):
        gen.fork(gen.new_context(prompt, _sampled(1), "q"), 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3"])
def test_every_arch_through_preemption_prefix_hits_and_windows(arch, one_thread):
    """Each architecture under pressure: a budget that forces preemptions, prompts sharing a
    two-block prefix (hits after the first wave), speculative windows, slot reuse; every
    request's greedy tokens equal transformers' generate."""
    from decodekit import NGramDraft

    rng = random.Random(arch)
    shared = [rng.randrange(3, 30) for _ in range(32)]
    prompts = [shared + [rng.randrange(3, 30) for _ in range(rng.randrange(2, 9))] for _ in range(5)]
    gen = _gen(arch=arch, max_batch_size=3, max_seq_len=64, kv_cache_tokens=7 * 16 + 4 * 16,
               draft=NGramDraft(n=1, k=3), adaptive_k=False)
    params = [SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True)] * 5
    ctxs, preempted = _through_scheduler(gen, prompts, params)
    assert preempted > 0 and gen.kv_stats.prefix_hit_tokens > 0 and gen.spec_stats.accepted > 0
    model = tiny_model(arch)
    assert [c.generated_token_ids for c in ctxs] == [hf_greedy(model, p, 20) for p in prompts]


def test_fork_of_a_preempted_request_reprefills_with_its_tokens():
    """A preempted request (no slot, tokens kept) forks into children that carry its tokens
    and sampler state and re-prefill when a call includes them: their raw logprobs match a
    cache-free transformers forward over their whole sequence."""
    model = tiny_model("llama")
    rng = random.Random(13)
    gen = _gen(max_batch_size=4, max_seq_len=64, kv_cache_tokens=6 * 16)
    ctxs = [gen.new_context([rng.randrange(3, VOCAB) for _ in range(18)], _sampled(20 + i, n=24), f"r{i}")
            for i in range(3)]
    kids: list = []
    while not all(c.is_done for c in ctxs + kids):
        gen.next_token({c.request_id: c for c in ctxs + kids if not c.is_done and c.slot is None}
                       | {c.request_id: c for c in ctxs + kids if c.slot is not None})
        victim = next((c for c in ctxs if c.preemptions and c.slot is None and not c.is_done), None)
        if victim is not None and not kids:
            kids = gen.fork(victim, 1)
            assert kids[0].generated_token_ids == victim.generated_token_ids and kids[0].slot is None
    assert kids and kids[0].is_done
    for c in ctxs + kids:
        got = [x for lp in c.logprobs for x in lp.token_log_probabilities]
        assert len(got) == 24
        torch.testing.assert_close(got, _hf_logprobs(model, c.tokens, 18), atol=1e-4, rtol=0)


def test_home_rows_read_as_views_give_the_gathered_results(monkeypatch):
    """On a CPU, a batch whose rows hold only home blocks reads keys and values as strided
    views of the stores instead of gathered copies. Same tokens and logprobs as the gather
    path (forced by refusing the hint), greedy equal to transformers, with joins, a prefix
    hit (copied into the joining row's home blocks: its prefill is still saved) and
    speculation."""
    from decodekit import NGramDraft

    rng = random.Random(5)
    prompts = [[rng.randrange(3, 60) for _ in range(rng.randrange(20, 40))] for _ in range(4)]
    prompts[3] = prompts[0][:33] + [7, 8]  # two full blocks of request 0's prompt: a prefix hit
    params = [SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, seed=4, max_new_tokens=24, ignore_eos=True, logprobs=2)]

    def run(home: bool) -> tuple[list, list, int]:
        calls = []
        real = KVBlocks.home_rows
        monkeypatch.setattr(KVBlocks, "home_rows",
                            lambda self, a, n: calls.append(real(self, a, n)) or (calls[-1] and home))
        gen = _gen(max_batch_size=4, draft=NGramDraft(n=2, k=3))
        ctxs = [gen.new_context(p, params[i in (1, 2)], f"r{i}") for i, p in enumerate(prompts)]
        live = {c.request_id: c for c in ctxs[:2]}
        step = 0
        while live or step < 3:
            if step == 3:  # joins: a fresh prompt and the prefix hit
                live.update({c.request_id: c for c in ctxs[2:]})
            gen.next_token(live)
            for k in [k for k, c in live.items() if c.is_done]:
                gen.release(live.pop(k))
            step += 1
        lps = [[lp.token_log_probabilities for lp in c.logprobs] for c in ctxs]
        assert gen.kv_stats.prefix_hit_tokens == 32  # request 3 took request 0's two full blocks
        assert all(calls) or not home  # every batch, the one with the prefix hit too, is home rows
        return [c.generated_token_ids for c in ctxs], lps, sum(calls)

    tokens, lps, home_steps = run(True)
    gathered, glps, _ = run(False)
    assert home_steps > 10  # the view path ran
    assert tokens == gathered  # logprobs to float tolerance (SDPA may sum in another order)
    for a, b in zip(lps, glps, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert tokens[0] == hf_greedy(tiny_model("llama"), prompts[0], 24)
    assert tokens[3] == hf_greedy(tiny_model("llama"), prompts[3], 24)  # the copied prefix is right
