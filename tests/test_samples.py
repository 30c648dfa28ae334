"""Many outputs per prompt (``n`` / ``best_of``), prompt logprobs, output kinds and prompt
truncation. Oracles: independent seeded requests, cache-free transformers forwards (logprobs,
prompt logprobs, the best_of ranking) and the tokenizer's own left truncation."""

from __future__ import annotations

import pytest
import torch
from _models import tiny_model, word_tokenizer

import decodekit.engine.scoring as scoring
from decodekit import LLM, RequestOutputKind, SamplingParams, TokenGenerator

PROMPT = [5, 9, 11, 5, 9, 17, 3, 40, 41, 42, 17, 3, 8, 8, 9, 100, 200, 31, 4, 6, 77, 78, 79, 12]


def _gen(model=None, **kw) -> TokenGenerator:
    return TokenGenerator(model or tiny_model("llama"), kw.pop("tokenizer", None), max_batch_size=8,
                          max_seq_len=96, seed=0, **kw)


def _finish(gen: TokenGenerator, ctxs, num_steps: int = 4) -> None:
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)


def _hf_logprobs(model, prompt: list[int], generated: list[int]) -> list[float]:
    """Raw log-probabilities of ``generated`` after ``prompt``: one cache-free forward."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        lp = model(ids).logits[0].float().log_softmax(-1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(generated)]


@pytest.mark.parametrize("kv_cache", ["paged", "slots"])
def test_samples_equal_independent_seeded_requests_from_one_prefill(kv_cache):
    model = tiny_model("llama")
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_new_tokens=10, ignore_eos=True, logprobs=2)
    gen = _gen(model, kv_cache=kv_cache)
    group = gen.new_contexts(PROMPT, params)
    assert [(c.parent_id, c.index) for c in group] == [(group[0].request_id, i) for i in range(4)]
    gen.next_token({c.request_id: c for c in group})
    assert gen.stats.prefill_tokens == len(PROMPT)  # one prefill for the four samples
    _finish(gen, group)
    outs = [c.generated_token_ids for c in group]
    assert len({tuple(o) for o in outs}) > 1, "the samples are all equal: a weak test"
    for i, c in enumerate(group):
        alone = _gen(model, kv_cache=kv_cache)
        ref = alone.new_context(PROMPT, params.replace(n=1, seed=11 + i))
        _finish(alone, [ref])
        assert c.generated_token_ids == ref.generated_token_ids, i
        want = _hf_logprobs(model, PROMPT, c.generated_token_ids)
        got = [lp.token_log_probabilities[0] for lp in c.logprobs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_best_of_keeps_the_n_best_by_hf_cumulative_logprob():
    model, tok = tiny_model("llama"), word_tokenizer()
    llm = LLM(model=model, tokenizer=tok, max_batch_size=8, max_seq_len=96, seed=0)
    params = SamplingParams(n=2, best_of=6, temperature=1.2, seed=5, max_new_tokens=8, ignore_eos=True)
    (out,) = llm.generate([PROMPT], params)
    assert len(out.outputs) == 2 and out.logprobs is None and out.outputs[0].logprobs is None
    # the six samples, each recomputed by HF from its seeded twin
    cands = []
    for i in range(6):
        ref = llm.generate([PROMPT], params.replace(n=1, best_of=None, seed=5 + i))[0]
        cands.append((sum(_hf_logprobs(model, PROMPT, ref.token_ids)), i, ref.token_ids))
    best = sorted(cands, key=lambda t: -t[0])[:2]
    assert [o.token_ids for o in out.outputs] == [b[2] for b in best]
    assert [o.index for o in out.outputs] == [b[1] for b in best]
    for o, b in zip(out.outputs, best, strict=True):
        assert abs(o.cumulative_logprob - b[0]) < 1e-3
    assert out.text == out.outputs[0].text and out.token_ids == out.outputs[0].token_ids


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_prompt_logprobs_equal_hf_log_softmax_over_several_chunks(monkeypatch, prefix_caching):
    model = tiny_model("qwen2")
    monkeypatch.setattr(scoring, "CHUNK_ELEMENTS", model.config.vocab_size * 5)  # 5 positions a chunk
    with torch.no_grad():
        ref = model(torch.tensor([PROMPT])).logits[0].float().log_softmax(-1)
    gen = _gen(model, prefix_caching=prefix_caching)
    warm = gen.new_context(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=2))
    _finish(gen, [warm])  # the prompt's blocks are in the prefix cache now
    plain = gen.new_context(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=6))
    scored = gen.new_context(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=6, prompt_logprobs=3))
    _finish(gen, [plain, scored])
    pl = scored.prompt_logprobs
    assert len(pl) == len(PROMPT) and pl[0] is None and plain.prompt_logprobs is None
    for i in range(1, len(PROMPT)):
        assert abs(pl[i].token_log_probabilities[0] - ref[i - 1, PROMPT[i]].item()) < 1e-4, i
        top = ref[i - 1].topk(3)
        want = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        got = pl[i].top_log_probabilities[0]
        assert set(want) <= set(got) and all(abs(got[t] - v) < 1e-4 for t, v in want.items()), i
    assert scored.generated_token_ids == plain.generated_token_ids


def test_output_kinds_delta_cumulative_final_agree_with_generate():
    model, tok = tiny_model("llama"), word_tokenizer()
    llm = LLM(model=model, tokenizer=tok, max_batch_size=4, max_seq_len=96, seed=0)
    base = SamplingParams(n=2, temperature=0.9, seed=3, max_new_tokens=9, ignore_eos=True, logprobs=1)
    prompts = [PROMPT, PROMPT[:7]]
    want = llm.generate(prompts, base)
    streams = {}
    for kind in RequestOutputKind:
        outs = list(llm.stream_outputs(prompts, base.replace(output_kind=kind)))
        streams[kind] = outs
        assert sum(o.finished for o in outs) == 2 and all(o.finished for o in outs if o.finish_reason)
    final = [o for o in streams[RequestOutputKind.FINAL_ONLY]]
    assert len(final) == 2
    delta: dict[str, dict[int, list]] = {}
    for o in streams[RequestOutputKind.DELTA]:
        for c in o.outputs:
            d = delta.setdefault(o.request_id, {}).setdefault(c.index, ["", [], []])
            d[0] += c.text
            d[1] += c.token_ids
            d[2] += c.logprobs
    assert len(streams[RequestOutputKind.DELTA]) > 2  # intermediate outputs came
    for w in want:
        fin = next(o for o in final if o.prompt_token_ids == w.prompt_token_ids)
        cum = [o for o in streams[RequestOutputKind.CUMULATIVE]
               if o.prompt_token_ids == w.prompt_token_ids][-1]
        dl = delta[next(o.request_id for o in streams[RequestOutputKind.DELTA]
                        if o.prompt_token_ids == w.prompt_token_ids)]
        for i, c in enumerate(w.outputs):
            for got in (fin.outputs[i], cum.outputs[i]):
                assert (got.text, got.token_ids, got.logprobs) == (c.text, c.token_ids, c.logprobs)
            assert dl[c.index] == [c.text, c.token_ids, c.logprobs]


def test_truncate_prompt_tokens_equals_tokenizer_left_truncation():
    model, tok = tiny_model("llama"), word_tokenizer()
    text = " ".join(f"w{i}" for i in range(10, 60))
    llm = LLM(model=model, tokenizer=tok, max_batch_size=2, max_seq_len=40, seed=0)
    tok.truncation_side = "left"
    for k in (7, -1):
        params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, truncate_prompt_tokens=k)
        (out,) = llm.generate([text], params)
        n = 40 - 8 if k == -1 else k
        assert out.prompt_token_ids == tok(text, truncation=True, max_length=n)["input_ids"], k
    gen = llm.generator
    ctx = gen.new_context(text, SamplingParams(max_new_tokens=8, truncate_prompt_tokens=5),
                          truncate_prompt_tokens=3)
    assert len(ctx.prompt_token_ids) == 3  # the keyword overrides the params
    with pytest.raises(ValueError, match="prompt has.*set truncate_prompt_tokens"):
        gen.new_context(text, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="truncate_prompt_tokens=-1: no prompt token fits"):
        gen.new_context(text, SamplingParams(max_new_tokens=40, truncate_prompt_tokens=-1))


def test_bad_values_name_the_field():
    for kw, field in [(dict(n=0), "n"), (dict(n=65), "n"), (dict(n=3, best_of=2), "best_of"),
                      (dict(prompt_logprobs=21), "prompt_logprobs"),
                      (dict(prompt_logprobs=-1), "prompt_logprobs"),
                      (dict(output_kind="partial"), "output_kind"),
                      (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
                      (dict(best_of=70), "best_of")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    gen = _gen()
    with pytest.raises(ValueError, match="new_contexts"):
        gen.new_context(PROMPT, SamplingParams(n=2))
    llm = LLM(model=tiny_model("llama"), tokenizer=word_tokenizer(), max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="stream_outputs"):
        next(llm.stream("w5 w6", SamplingParams(n=2)))


def test_samples_share_grammar_steering_and_drafter():
    """Every sample keeps its parent's grammar (a forked matcher), steering and drafter; each
    still equals its independently seeded twin."""
    from decodekit import GuidedDecodingParams, NGramDraft, Steering

    model, tok = tiny_model("llama"), word_tokenizer()
    g = torch.Generator().manual_seed(0)
    steer = Steering({1: torch.randn(model.config.hidden_size, generator=g)}, 4.0)
    spec = GuidedDecodingParams(choice=["w5", "w7", "w9", "w11", "w13"])
    params = SamplingParams(n=5, temperature=1.5, seed=2, max_new_tokens=6, guided_decoding=spec)

    def make():
        return TokenGenerator(model, tok, max_batch_size=5, max_seq_len=64, seed=0, draft=NGramDraft(k=2))

    gen = make()
    group = gen.new_contexts(PROMPT, params, steering=steer)
    _finish(gen, group)
    texts = [c.text.strip() for c in group]  # (the word tokenizer's text starts with a space)
    assert all(t in spec.choice for t in texts) and all(c.finish_reason == "stop" for c in group), texts
    assert len(set(texts)) > 1
    for i, c in enumerate(group):
        alone = make()
        ref = alone.new_context(PROMPT, params.replace(n=1, seed=2 + i), steering=steer)
        _finish(alone, [ref])
        assert ref.generated_token_ids == c.generated_token_ids, i
