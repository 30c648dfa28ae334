"""Ensembles: the combined distribution equals each member's cache-free HF logits combined by
the formula (mixture and product), greedy tokens equal a loop of HF forwards plus the formula
(joins, multi-step calls, forks, members of other architectures), and bad configurations are
ValueErrors naming what is wrong."""

from __future__ import annotations

import math

import pytest
import torch
from _models import tiny_model, word_tokenizer

from decodekit import LLM, Ensemble, SamplingParams, TokenGenerator

PROMPTS = [[5, 9, 11, 5, 9], [17, 3, 40, 41]]


def _members():
    return tiny_model("llama"), [tiny_model("llama", seed=1), tiny_model("qwen2")]


def _formula(models, seq: list[int], weights, combine: str) -> torch.Tensor:
    """log p of the next token of ``seq``: each model's cache-free forward, then the formula."""
    with torch.no_grad():
        lsm = torch.stack([torch.log_softmax(m(torch.tensor([seq])).logits[0, -1].float(), -1)
                           for m in models])
    w = torch.tensor(weights)[:, None]
    if combine == "mixture":
        w = w / w.sum()
        return torch.logsumexp(lsm + w.log(), 0)
    return torch.log_softmax((lsm * w).sum(0), -1)


@pytest.mark.parametrize("combine", ["mixture", "product"])
def test_ensemble_matches_hf_forwards_and_the_formula(combine):
    target, members = _members()
    weights = [1.0, 2.0, 0.5]
    gen = TokenGenerator(target, None, max_batch_size=3, max_seq_len=64, seed=0,
                         ensemble=Ensemble(members, weights, combine))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=3, max_new_tokens=10, ignore_eos=True, logprobs=0)
    a = gen.new_context(PROMPTS[0], greedy)
    b = gen.new_context(PROMPTS[1], sampled)
    gen.next_token({a.request_id: a}, num_steps=3)  # b joins later
    while not (a.is_done and b.is_done):
        gen.next_token({c.request_id: c for c in (a, b) if not c.is_done}, num_steps=4)
    models = [target, *members]
    seq = list(PROMPTS[0])
    for _ in range(10):  # greedy: the loop of HF forwards + formula
        seq.append(int(_formula(models, seq, weights, combine).argmax()))
    assert a.generated_token_ids == seq[len(PROMPTS[0]):]
    seq = list(PROMPTS[1])
    for tok, lp in zip(b.generated_token_ids, b.logprobs, strict=True):  # raw logprobs = the combination
        want = float(_formula(models, seq, weights, combine)[tok])
        assert math.isclose(lp.token_log_probabilities[0], want, abs_tol=1e-5), (tok, want)
        seq.append(tok)


def test_ensemble_fork_children_are_independent_seeded_requests():
    target, members = _members()
    ens = Ensemble(members[:1])

    def gen():
        return TokenGenerator(target, None, max_batch_size=3, max_seq_len=64, seed=0, ensemble=ens)

    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=8, ignore_eos=True)
    g = gen()
    root = g.new_context(PROMPTS[0], params)
    kids = g.fork(root, 2)
    batch = {c.request_id: c for c in [root, *kids]}
    while any(not c.is_done for c in batch.values()):  # (children take one token in the first call)
        g.next_token({k: c for k, c in batch.items() if not c.is_done}, num_steps=8)
    for i, kid in enumerate(kids, start=1):
        solo = gen()
        c = solo.new_context(PROMPTS[0], params.replace(seed=11 + i))
        solo.next_token({c.request_id: c}, num_steps=8)
        assert kid.generated_token_ids == c.generated_token_ids


def test_bad_ensembles_are_value_errors():
    target, members = _members()
    with pytest.raises(ValueError, match="non-empty list"):
        Ensemble([])
    with pytest.raises(ValueError, match="weights must be 3"):
        Ensemble(members, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be 2"):
        Ensemble(members[:1], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="combine"):
        Ensemble(members, combine="max")
    other = tiny_model("llama")
    big = type(other)(type(other.config)(**{**other.config.to_dict(), "vocab_size": 400})).eval()
    with pytest.raises(ValueError, match="share the target's vocabulary"):
        TokenGenerator(target, None, max_batch_size=1, max_seq_len=32, ensemble=Ensemble([big]))
    from decodekit import NGramDraft

    with pytest.raises(ValueError, match="ensemble and draft"):
        TokenGenerator(target, None, max_batch_size=1, max_seq_len=32, ensemble=Ensemble(members),
                       draft=NGramDraft())
    with pytest.raises(ValueError, match="ensemble must be an Ensemble"):
        TokenGenerator(target, None, max_batch_size=1, max_seq_len=32, ensemble=members)


def test_llm_ensemble_models_keyword():
    target, members = _members()
    llm = LLM(model=target, tokenizer=word_tokenizer(), max_batch_size=2, max_seq_len=64,
              ensemble_models=members,
              ensemble_combine="product")
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True))
    seq = list(PROMPTS[0])
    for _ in range(5):
        seq.append(int(_formula([target, *members], seq, [1.0, 1.0, 1.0], "product").argmax()))
    assert out[0].token_ids == seq[len(PROMPTS[0]):]


def test_ensemble_through_preemption_gives_the_same_tokens():
    """A paged cache too small for both requests preempts one; its members re-prefill with it."""
    target, members = _members()
    params = SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True)

    def run(**kw) -> tuple[list[list[int]], int]:
        g = TokenGenerator(target, None, max_batch_size=2, max_seq_len=48, seed=0,
                           ensemble=Ensemble(members), **kw)
        cs = [g.new_context(p, params) for p in PROMPTS]
        while any(not c.is_done for c in cs):
            g.next_token({c.request_id: c for c in cs if not c.is_done}, num_steps=4)
        return [c.generated_token_ids for c in cs], sum(c.preemptions for c in cs)

    roomy, _ = run()
    tight, preempted = run(kv_cache_tokens=64)
    assert preempted > 0 and tight == roomy
