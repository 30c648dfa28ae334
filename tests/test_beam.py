"""Beam search (:mod:`decodekit.engine.beam`) against transformers' own
``model.generate(num_beams=k, do_sample=False)`` as the oracle: the same sequences, token for
token and in the same order, and ``score`` equal to HF's ``sequences_scores``, on tiny random
models of three architectures (fp32), over beam widths 1..5, length penalties
{-0.5, 0, 1, 2} and every ``early_stopping`` value. The "EOS-prone" models have their EOS
output row pushed towards the mean hidden state, so that beams end on EOS at varied steps
(each test checks that some did); the plain tiny models almost never emit EOS.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import random

import pytest
import torch
from _models import EOS_ID, VOCAB, tiny_model, word_tokenizer
from transformers import LogitsProcessor, LogitsProcessorList

from decodekit.engine.beam import BeamScores, BeamSearchOutput, BeamSearchParams
from decodekit.engine.generator import TokenGenerator

WIDTHS = [1, 2, 3, 4, 5]
PENALTIES = [-0.5, 0.0, 1.0, 2.0]
MAX_TOKENS = 9
SEEDS = {"llama": 0, "qwen2": 10, "gemma2": 20}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one torch thread is faster (and leaves the other core free)."""


@functools.cache
def eos_model(arch: str, alpha: float = 1.5):
    """``tiny_model(arch)`` with ``alpha`` x the unit mean final hidden state (over random prompts)
    added to EOS's output row: EOS becomes likely after some prompts and tokens, not all."""
    model = copy.deepcopy(tiny_model(arch))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h = model.model(torch.randint(3, VOCAB, (16, 12), generator=g)).last_hidden_state.mean((0, 1))
        model.get_output_embeddings().weight[EOS_ID] += alpha * h / h.norm()
    return model


def prompts_for(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def hf_beams(model, prompt: list[int], k: int, n: int, eos=EOS_ID, **kw) -> list[tuple[list[int], float]]:
    """transformers' beam search of one prompt: ``(generated tokens, sequences_scores)`` per
    returned sequence, best first, the padding after a shorter sequence stripped (its length
    read off ``beam_indices``). Width 1 is greedy in transformers: the score is computed from
    its per-step logits."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                             do_sample=False, max_new_tokens=n, output_scores=True,
                             return_dict_in_generate=True, disable_compile=True, eos_token_id=eos,
                             pad_token_id=0, **kw)
    gen = out.sequences[:, len(prompt):]
    if k == 1:
        toks = gen[0].tolist()
        steps = zip(out.scores, toks, strict=True)
        cum = sum(float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in steps)
        return [(toks, cum / len(toks) ** kw.get("length_penalty", 1.0))]
    lengths = (out.beam_indices != -1).sum(1).tolist()
    return [(gen[j, :lengths[j]].tolist(), float(out.sequences_scores[j])) for j in range(k)]


def check_same(ours: BeamSearchOutput, expect: list[tuple[list[int], float]], lp: float, what: str,
               eos: list[int] = (EOS_ID,)) -> None:
    assert len(ours.sequences) == len(expect), what
    for j, (seq, (toks, score)) in enumerate(zip(ours.sequences, expect, strict=True)):
        assert seq.token_ids == toks, f"{what}: sequence {j}"
        assert math.isclose(seq.score, score, rel_tol=1e-6, abs_tol=1e-4), f"{what}: {j} {seq.score} {score}"
        assert math.isclose(seq.cumulative_logprob, seq.score * len(toks) ** lp, rel_tol=1e-5, abs_tol=1e-4)
        assert seq.finish_reason == ("stop" if toks[-1] in eos else "length"), what


def make_gen(model, **kw) -> TokenGenerator:
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_seq_len", 64)
    return TokenGenerator(model, word_tokenizer(), **kw)


# ----------------------------------------------------------------------------------------------
# 1. Identity with transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_matches_hf_generate(arch, early_stopping):
    """Every width and length penalty, three prompts searched together (one decode forward per
    step for all, as far as the slots go) and compared with transformers one prompt at a time."""
    model = eos_model(arch)
    gen = make_gen(model, max_batch_size=10)
    prompts = prompts_for(SEEDS[arch] + ["never", False, True].index(early_stopping), 3)
    stopped = early = 0
    for k in WIDTHS:
        for lp in PENALTIES:
            params = BeamSearchParams(beam_width=k, max_tokens=MAX_TOKENS, length_penalty=lp,
                                      early_stopping=early_stopping)
            outs = gen.beam_search(prompts, params)
            for p, out in zip(prompts, outs, strict=True):
                expect = hf_beams(model, p, k, MAX_TOKENS, length_penalty=lp, early_stopping=early_stopping)
                check_same(out, expect, lp, f"{arch} k={k} lp={lp} es={early_stopping} prompt {p}")
                stopped += sum(s.finish_reason == "stop" for s in out.sequences)
                early += max(len(s.token_ids) for s in out.sequences) < MAX_TOKENS
            assert gen.free_slots == list(range(10))
    assert stopped >= 20 and early >= 2, (stopped, early)  # finished beams were exercised


@pytest.mark.parametrize("kv_cache", ["paged", "slots"])
def test_cache_kinds_and_plain_models(kv_cache):
    """Both KV caches (small blocks: forks share and copy blocks mid-sequence), the plain tiny
    models (beams almost never end on EOS) and fewer returned sequences than beams."""
    kw = {"block_size": 4} if kv_cache == "paged" else {}
    for arch, model in [("llama", tiny_model("llama")), ("qwen2", eos_model("qwen2"))]:
        gen = make_gen(model, max_batch_size=9, kv_cache=kv_cache, **kw)
        prompts = prompts_for(7, 4)  # 3 beams each: the fourth prompt waits for a second group
        params = BeamSearchParams(beam_width=3, max_tokens=12, num_return_sequences=2)
        outs = gen.beam_search(prompts, params)
        assert [o.prompt_token_ids for o in outs] == prompts
        for p, out in zip(prompts, outs, strict=True):
            check_same(out, hf_beams(model, p, 3, 12)[:2], 1.0, f"{arch} {kv_cache} {p}")
        assert gen.free_slots == list(range(9))
    if kv_cache == "paged":
        assert gen.kv_stats.copied_blocks > 0  # copy on write ran
        assert gen.runner.kv.num_usable == gen.runner.kv.pool.num_blocks - 1  # every block back


def test_several_eos_ids():
    """Two EOS ids, both likely: 3 x k candidates per step (2 x k would leave steps where every
    kept candidate ends), either id ends a beam."""
    model = copy.deepcopy(tiny_model("llama"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        h = model.model(torch.randint(4, VOCAB, (16, 12), generator=g)).last_hidden_state.mean((0, 1))
        for t, alpha in ((EOS_ID, 4.0), (3, 3.8)):
            model.get_output_embeddings().weight[t] += alpha * h / h.norm()
    eos = [EOS_ID, 3]
    model.generation_config.eos_token_id = eos
    gen = make_gen(model)
    assert gen.eos_token_ids == eos
    ends = set()
    for p, (lp, es) in itertools.product(prompts_for(3, 4), [(1.0, False), (2.0, "never")]):
        params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, length_penalty=lp, early_stopping=es)
        out = gen.beam_search([p], params)[0]
        expect = hf_beams(model, p, 3, MAX_TOKENS, eos=eos, length_penalty=lp, early_stopping=es)
        check_same(out, expect, lp, f"eos {eos} prompt {p} lp={lp} es={es}", eos)
        ends |= {s.token_ids[-1] for s in out.sequences if s.finish_reason == "stop"}
    assert ends == set(eos)  # beams ended on either id


def test_ignore_eos():
    model = eos_model("gemma2")
    gen = make_gen(model)
    inner = 0
    for p in prompts_for(11, 3):
        out = gen.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
        check = [(toks, s) for toks, s in hf_beams(model, p, 3, MAX_TOKENS, eos=None)]
        for seq, (toks, score) in zip(out.sequences, check, strict=True):
            assert seq.token_ids == toks and math.isclose(seq.score, score, abs_tol=1e-4)
            assert len(toks) == MAX_TOKENS and seq.finish_reason == "length"
            inner += EOS_ID in toks
    assert inner  # EOS was drawn and did not end the beam


class _Temperature(LogitsProcessor):
    """log_softmax(log_softmax(logits) / T) == log_softmax(logits / T): transformers' beam search
    applies processors to the log-probabilities, so this gives the logits divided before."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self, input_ids, scores):
        return torch.log_softmax(scores / self.t, dim=-1)


def test_temperature_divides_the_logits():
    model = eos_model("llama")
    gen = make_gen(model)
    p = prompts_for(5, 1)[0]
    for t in (0.7, 1.6):
        out = gen.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS, temperature=t))[0]
        expect = hf_beams(model, p, 3, MAX_TOKENS, logits_processor=LogitsProcessorList([_Temperature(t)]))
        check_same(out, expect, 1.0, f"T={t}")
    zero, one = (gen.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=6, temperature=t))[0]
                 for t in (0.0, 1.0))
    assert zero.sequences == one.sequences


# ----------------------------------------------------------------------------------------------
# 2. Outputs, prompts and text
# ----------------------------------------------------------------------------------------------
def test_text_prompts_and_stop_text():
    model = eos_model("llama")
    tok = word_tokenizer()
    gen = make_gen(model)
    p = prompts_for(0, 6)[4]  # every beam of this prompt ends on EOS
    text = " ".join(f"w{i}" for i in p)
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    a, b, c = gen.beam_search([text, p, torch.tensor(p)], params)
    assert a.prompt_token_ids == b.prompt_token_ids == c.prompt_token_ids == p
    for x in (b, c):  # (a and b ran in one forward, c alone: scores agree to rounding)
        assert [s.token_ids for s in x.sequences] == [s.token_ids for s in a.sequences]
        pairs = zip(x.sequences, a.sequences, strict=True)
        assert all(math.isclose(s.score, t.score, abs_tol=1e-4) for s, t in pairs)
    assert any(s.finish_reason == "stop" for s in a.sequences)
    for s in a.sequences:
        body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
        assert s.text == tok.decode(body, skip_special_tokens=True) and "</s>" not in s.text
    kept = gen.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS,
                                                 include_stop_str_in_output=True))[0]
    for s, s0 in zip(kept.sequences, a.sequences, strict=True):
        assert s.text == (s0.text + "</s>" if s.finish_reason == "stop" else s0.text)
    bare = TokenGenerator(model, None, max_batch_size=4, max_seq_len=64)
    out = bare.beam_search([p], params)[0]
    assert [s.token_ids for s in out.sequences] == [s.token_ids for s in a.sequences]
    assert all(s.text == "" for s in out.sequences)
    assert len({a.request_id, b.request_id, c.request_id}) == 3


def test_prompt_checks():
    gen = make_gen(tiny_model("llama"), max_seq_len=32)
    params = BeamSearchParams(beam_width=2, max_tokens=8)
    for bad in ([5, 6, 7], "w5 w6", [{"role": "user", "content": "x"}]):
        with pytest.raises(ValueError, match="list of prompts"):
            gen.beam_search(bad, params)
    with pytest.raises(ValueError, match="prompt has 30 tokens"):
        gen.beam_search([[5] * 30], params)
    with pytest.raises(ValueError, match="empty"):
        gen.beam_search([[]], params)
    with pytest.raises(TypeError, match="BeamSearchParams"):
        gen.beam_search([[5, 6]], {"beam_width": 2})
    assert gen.free_slots == list(range(8))


# ----------------------------------------------------------------------------------------------
# 3. Parameters
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, allowed", [
    ("beam_width", 0, r"\[1, 64\]"), ("beam_width", 65, r"\[1, 64\]"), ("beam_width", 2.0, "int"),
    ("beam_width", True, "int"), ("max_tokens", 0, ">= 1"), ("max_tokens", None, ">= 1"),
    ("temperature", -0.1, ">= 0"), ("temperature", float("inf"), ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("length_penalty", float("nan"), "finite"), ("length_penalty", "1", "real number"),
    ("early_stopping", "always", "True, False or 'never'"), ("early_stopping", 1, "True, False or 'never'"),
    ("early_stopping", None, "True, False or 'never'"), ("num_return_sequences", 0, r"\[1, beam_width=3\]"),
    ("num_return_sequences", 4, r"\[1, beam_width=3\]"), ("ignore_eos", 1, "bool"),
    ("include_stop_str_in_output", "yes", "bool"),
])
def test_bad_params_name_the_field(field, value, allowed):
    kw = {"beam_width": 3, "max_tokens": 4, field: value}
    with pytest.raises(ValueError, match=field) as err:
        BeamSearchParams(**kw)
    assert err.match(allowed)


def test_params_defaults():
    p = BeamSearchParams(beam_width=4, max_tokens=2)
    assert (p.n_return, p.temperature, p.length_penalty, p.early_stopping) == (4, 0.0, 1.0, False)
    assert BeamSearchParams(beam_width=4, max_tokens=2, num_return_sequences=1).n_return == 1
    with pytest.raises(AttributeError):
        p.beam_width = 2  # frozen


# ----------------------------------------------------------------------------------------------
# 4. Slots: width limit, sharing the generator, failures
# ----------------------------------------------------------------------------------------------
def test_width_beyond_free_slots_and_a_busy_generator():
    """Beam search takes free slots only; a request running on the generator goes on exactly
    as without it (greedy = transformers' greedy continuation)."""
    model = tiny_model("qwen2")
    gen = make_gen(model, max_batch_size=4)
    with pytest.raises(ValueError, match="beam_width 5 exceeds the 4 free slots"):
        gen.beam_search([[5, 6]], BeamSearchParams(beam_width=5, max_tokens=4))
    from decodekit import SamplingParams

    prompt = prompts_for(2, 1)[0]
    ctx = gen.new_context(prompt, SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True), "busy")
    gen.next_token({"busy": ctx}, num_steps=3)
    with pytest.raises(ValueError, match="beam_width 4 exceeds the 3 free slots"):
        gen.beam_search([[5, 6]], BeamSearchParams(beam_width=4, max_tokens=4))
    p = prompts_for(9, 1)[0]
    out = gen.beam_search([p, p], BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS))
    check_same(out[1], hf_beams(model, p, 3, MAX_TOKENS), 1.0, "beside a running request")
    assert gen.free_slots == [1, 2, 3]
    while not ctx.is_done:
        gen.next_token({"busy": ctx}, num_steps=4)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                              min_new_tokens=12, eos_token_id=None, pad_token_id=0,
                              disable_compile=True)[0, len(prompt):].tolist()
    assert ctx.generated_token_ids == want


@pytest.mark.parametrize("kv_cache", ["paged", "slots"])
def test_failure_mid_search_frees_everything(kv_cache):
    model = eos_model("llama")
    gen = make_gen(model, max_batch_size=6, kv_cache=kv_cache)
    prompts = prompts_for(1, 3)
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    before = gen.beam_search(prompts, params)
    usable = None if gen.runner.kv is None else gen.runner.kv.num_usable
    calls = 0

    def boom(*_):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure")

    h = model.register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            gen.beam_search(prompts, params)
    finally:
        h.remove()
    assert calls == 3 and gen.free_slots == list(range(6))
    if usable is not None:
        assert gen.runner.kv.num_usable == usable
    after = gen.beam_search(prompts, params)
    assert [o.sequences for o in after] == [o.sequences for o in before]
    from decodekit import SamplingParams

    ctx = gen.new_context(prompts[0], SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
    gen.next_token({ctx.request_id: ctx}, num_steps=4)
    assert len(ctx.generated_token_ids) == 4


def test_one_topk_per_step():
    """The selection is one topk over the request's [k * V] scores (plus the two small ones over
    the candidates): count the topk calls over a full-width row."""
    state = BeamScores(2, BeamSearchParams(beam_width=3, max_tokens=5), [EOS_ID], torch.device("cpu"))
    seen = []
    real = torch.topk

    def spy(x, k, *a, **kw):
        seen.append(tuple(x.shape))
        return real(x, k, *a, **kw)

    torch.topk = spy
    try:
        state.advance(torch.log_softmax(torch.randn(2, 3, VOCAB), -1), 0)
    finally:
        torch.topk = real
    assert seen.count((2, 3 * VOCAB)) == 1 and all(s[-1] <= 3 * VOCAB for s in seen)
    cpu = torch.device("cpu")
    widths = [BeamScores(1, state.params, eos, cpu).width for eos in ([], [2], [2, 3], [2, 3, 4])]
    assert widths == [6, 6, 9, 12]  # max(2, 1 + n_eos) * k


# ----------------------------------------------------------------------------------------------
# 5. The embedded SmolLM2-135M-Instruct (chat prompts; beams end on EOS)
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm_chat_beams_match_hf():
    from decodekit import load

    model, tok = load(device="cpu", dtype=torch.float32)
    gen = TokenGenerator(model, tok, max_batch_size=8, max_seq_len=256)
    questions = ["What is 2 + 2? Answer with one number.", "Say hi.", "Name a color. One word."]
    stopped = 0
    for q, (k, lp, es) in zip(questions, [(4, 1.0, False), (3, 0.0, True), (2, 2.0, "never")], strict=True):
        msgs = [{"role": "user", "content": q}]
        out = gen.beam_search([msgs], BeamSearchParams(beam_width=k, max_tokens=24, length_penalty=lp,
                                                       early_stopping=es))[0]
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            hf = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                                do_sample=False, length_penalty=lp, early_stopping=es, max_new_tokens=24,
                                output_scores=True, return_dict_in_generate=True, disable_compile=True,
                                eos_token_id=gen.eos_token_ids, pad_token_id=tok.pad_token_id)
        lengths = (hf.beam_indices != -1).sum(1).tolist()
        for j, s in enumerate(out.sequences):
            want = hf.sequences[j, ids.shape[1]:ids.shape[1] + lengths[j]].tolist()
            assert s.token_ids == want, (q, j)
            assert math.isclose(s.score, float(hf.sequences_scores[j]), abs_tol=1e-4)
            stopped += s.finish_reason == "stop"
            body = s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids
            assert s.text == tok.decode(body, skip_special_tokens=True)
    assert stopped >= 3
    assert gen.free_slots == list(range(8))


def test_steering_steers_every_beam_and_keeps_the_prefix_cache_clean():
    """A steered search equals transformers' beam search under ``decodekit.steer`` (every beam
    steered alike); afterwards an unsteered request of the same prompt is not served the steered
    blocks from the prefix cache."""
    from _models import hf_greedy

    from decodekit import SamplingParams, Steering, steer

    model = eos_model("llama")
    g = torch.Generator().manual_seed(3)
    vec = {0: 2.0 * torch.randn(model.config.hidden_size, generator=g)}  # layer 0: changes the KV
    gen = make_gen(model, block_size=4)
    prompt = prompts_for(5, 1)[0] * 2  # long enough for full blocks
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    (out,) = gen.beam_search([prompt], params, steering=Steering(vec, 1.5))
    with steer(model, vec, 1.5):
        expect = hf_beams(model, prompt, 3, MAX_TOKENS)
    check_same(out, expect, 1.0, "steered")
    assert [s.token_ids for s in out.sequences] != [t for t, _ in hf_beams(model, prompt, 3, MAX_TOKENS)]
    ctx = gen.new_context(prompt, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    while not ctx.is_done:
        gen.next_token({ctx.request_id: ctx})
    assert ctx.generated_token_ids == hf_greedy(model, prompt, 6)


def test_llm_beam_search_takes_one_or_several_prompts():
    from decodekit import LLM

    model = eos_model("qwen2")
    llm = LLM(model=model, tokenizer=word_tokenizer(), max_batch_size=6, max_seq_len=64)
    params = BeamSearchParams(beam_width=2, max_tokens=MAX_TOKENS, length_penalty=0.0)
    p = prompts_for(11, 2)
    outs = llm.beam_search(p, params)
    assert [o.prompt_token_ids for o in outs] == p
    (one,) = llm.beam_search(p[0], params)
    check_same(one, hf_beams(model, p[0], 2, MAX_TOKENS, length_penalty=0.0), 0.0, "LLM")
    assert [s.token_ids for s in one.sequences] == [s.token_ids for s in outs[0].sequences]


def test_a_cache_too_small_for_the_beams_is_a_clear_error_and_frees_everything():
    """Beams next to a running request on a small paged cache: ``OutOfBlocks`` saying what to
    change, every slot back, and the running request goes on as if nothing had happened."""
    from _models import hf_greedy

    from decodekit import SamplingParams
    from decodekit.engine.blocks import OutOfBlocks

    model = tiny_model("llama")
    gen = make_gen(model, max_batch_size=4, kv_cache_tokens=96, block_size=16)
    prompt = prompts_for(3, 1)[0]
    ctx = gen.new_context(prompt, SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True))
    gen.next_token({ctx.request_id: ctx}, num_steps=20)
    with pytest.raises(OutOfBlocks, match="beam search ran out of KV blocks.*kv_cache_tokens"):
        gen.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=30))
    assert gen.free_slots == [1, 2, 3]
    while not ctx.is_done:
        gen.next_token({ctx.request_id: ctx}, num_steps=8)
    assert ctx.generated_token_ids == hf_greedy(model, prompt, 40)


def test_lora_adapts_every_beam_and_keeps_the_prefix_cache_clean(tmp_path):
    """A search with a LoRA adapter equals transformers' beam search on peft's PeftModel with
    that adapter (the oracle); the adapter is pinned only while the search runs; an unadapted
    request of the same prompt afterwards is not served the adapted blocks; an unknown adapter
    is a ValueError naming ``lora``."""
    from _models import hf_greedy
    from _peft import save_adapter

    from decodekit import SamplingParams

    model = eos_model("llama")
    oracle = save_adapter(model, tmp_path / "a", 7, std=0.2, r=8,
                          target_modules=["q_proj", "k_proj", "v_proj"])
    gen = make_gen(model, block_size=4, max_loras=1, max_lora_rank=8)
    assert gen.load_lora("a", tmp_path / "a").ok
    prompt = prompts_for(6, 1)[0] * 2  # long enough for full blocks
    params = BeamSearchParams(beam_width=3, max_tokens=MAX_TOKENS)
    (out,) = gen.beam_search([prompt], params, lora="a")
    check_same(out, hf_beams(oracle, prompt, 3, MAX_TOKENS), 1.0, "adapted")
    plain = hf_beams(model, prompt, 3, MAX_TOKENS)
    assert [s.token_ids for s in out.sequences] != [t for t, _ in plain]  # the adapter mattered
    assert gen.unload_lora("a").ok and gen.load_lora("a", tmp_path / "a").ok  # not pinned any more
    ctx = gen.new_context(prompt, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
    while not ctx.is_done:
        gen.next_token({ctx.request_id: ctx})
    assert ctx.generated_token_ids == hf_greedy(model, prompt, 6)
    with pytest.raises(ValueError, match="lora"):
        gen.beam_search([prompt], params, lora="missing")
    assert gen.slots.num_free == gen.max_batch_size
    from decodekit import LLM

    llm = LLM(model=model, tokenizer=word_tokenizer(), max_batch_size=4, max_seq_len=64, max_loras=1,
              max_lora_rank=8)
    (via_path,) = llm.beam_search(prompt, params, lora=tmp_path / "a")  # a folder, loaded on first use
    assert [s.token_ids for s in via_path.sequences] == [s.token_ids for s in out.sequences]
