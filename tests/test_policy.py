"""DraftPolicy and WindowCost (issue 19): the plan maximises expected tokens per unit of
verification cost (oracle: a brute-force search over every draft-length vector), break-even
follows the measured cost, and the generator measures the cost when it is built."""

from __future__ import annotations

import itertools
import random

import pytest
from _models import tiny_model, word_tokenizer

from decodekit import NGramDraft, TokenGenerator
from decodekit.speculative.policy import CONFIDENT_HIT, DraftPolicy, WindowCost

CPU = WindowCost({1: 1.0, 2: 1.8, 17: 2.0, 64: 5.0})  # SmolLM2 fp32 on 2 cores, roughly
GPU = WindowCost({1: 1.0, 64: 1.1, 256: 1.6})  # bandwidth-bound decode


def _value(lengths, hg, cost, draft_cost=0.0):
    """Expected tokens per unit of cost of a plan, by direct summation; the window is
    rectangular (every row padded to the longest draft)."""
    B, L = len(lengths), max(lengths)
    expected = B + sum(sum(h * g ** (j - 1) for j in range(1, n + 1))
                       for n, (h, g) in zip(lengths, hg, strict=True))
    return expected / (cost(B * (L + 1)) + draft_cost * L * cost(B))


def _policy(k, cost, stats, draft_cost=0.0):
    """A policy whose slots carry the given (drafted, accepted) histories."""
    pol = DraftPolicy(k, draft_cost, cost, prior=(0.5, 0.7))
    for s, hist in enumerate(stats):
        pol.admit(s)
        for d, a in hist:
            pol.update(s, d, a)
    return pol


def test_plan_is_the_best_length_vector():
    rng = random.Random(0)
    drafted = 0
    for _ in range(300):
        B, k = rng.randint(1, 3), rng.randint(1, 5)
        cost = WindowCost({1: 1.0, 2: 1 + rng.random(), 4: 2 + rng.random(), 16: 4 + 4 * rng.random()})
        draft_cost = rng.choice([0.0, 0.0, 0.1, 0.5])
        hist = [[(rng.randint(1, k), rng.randint(0, 1) * rng.randint(0, k)) for _ in range(rng.randint(0, 4))]
                for _ in range(B)]
        hist = [[(d, min(a, d)) for d, a in h] for h in hist]
        pol = _policy(k, cost, hist, draft_cost)
        caps = [rng.randint(0, k) for _ in range(B)]
        sure = [rng.random() < 0.2 for _ in range(B)]
        hg = [pol.acceptance(s, sure[s]) for s in range(B)]
        plan = pol.plan(list(range(B)), caps, sure)
        assert all(0 <= n <= c for n, c in zip(plan, caps, strict=True))
        best = max(_value(v, hg, cost, draft_cost) for v in itertools.product(*(range(c + 1) for c in caps)))
        assert _value(plan, hg, cost, draft_cost) >= best * (1 - 1e-9), (plan, caps, hg)
        drafted += sum(plan)
    assert drafted > 100  # the search is not trivially "draft nothing"


def test_estimates_follow_the_history():
    """h: decayed share of drafts whose first token was accepted; g: of the tokens tried after
    an accepted one, the accepted share; both pulled to the prior with weight 2."""
    pol = DraftPolicy(8, 0.0, CPU, prior=(0.5, 0.5))
    pol.admit(0)
    assert pol.acceptance(0) == (0.5, 0.5)
    pol.update(0, 8, 8)  # a full run: 7 tokens tried after the first, all kept
    assert pol.acceptance(0) == pytest.approx(((1 + 1) / 3, (7 + 1) / 9))
    pol.update(0, 8, 0)  # a miss: 0.85 * old counts
    h = (0.85 + 1) / (0.85 + 1 + 2)
    assert pol.acceptance(0)[0] == pytest.approx(h)
    assert pol.acceptance(0, confident=True)[0] == CONFIDENT_HIT


def test_break_even_follows_the_cost():
    """The same history drafts on a GPU-like cost (verifying more tokens is nearly free) and
    not on a CPU-like one (two tokens already cost 1.8); a copying request drafts long on
    both; a confident step drafts although the history says no."""
    weak = [(8, 1), (8, 0), (8, 1), (8, 0)]
    copying = [(8, 8), (8, 8), (8, 5)]
    assert _policy(8, GPU, [weak]).plan([0], [8]) != [0]
    assert _policy(8, CPU, [weak]).plan([0], [8]) == [0]
    assert _policy(8, CPU, [copying]).plan([0], [8]) == [8]
    assert _policy(8, CPU, [weak]).plan([0], [8], [True])[0] > 0


def test_batch_plan_pads_to_the_longest_draft():
    """At batch 8 the window is 8 x (L + 1) positions whatever each row drafts: where the cost
    grows with the tokens beyond 8 (compute-bound) rows that rarely hit draft nothing, and on a
    flat cost they do; rows that copy draft, the others ride along at the same length for free;
    a row's cap still holds."""
    weak, copying = [(8, 0), (8, 0), (8, 1)], [(8, 8), (8, 8)]
    bound = WindowCost({1: 1.0, 8: 2.0, 64: 10.0})
    assert _policy(8, bound, [weak] * 8).plan(list(range(8)), [8] * 8) == [0] * 8
    assert all(n > 0 for n in _policy(8, GPU, [weak] * 8).plan(list(range(8)), [8] * 8))
    plan = _policy(8, CPU, [copying] * 3 + [weak] * 5).plan(list(range(8)), [8] * 7 + [1])
    assert plan[0] > 1 and plan[:7] == [plan[0]] * 7 and plan[7] == 1


def test_an_idle_request_drifts_back_to_the_prior():
    """After rejections a request stops drafting; steps without a draft pull its counts back
    to the prior, so a drafter with a hopeful prior (a model) tries again; prompt lookup's
    prior (a guess is rarely right) waits for a confident match."""
    pol = DraftPolicy(4, 0.0, CPU, prior=(0.6, 0.6))
    pol.admit(0)
    assert pol.plan([0], [4]) == [4]
    for _ in range(4):
        pol.update(0, 4, 0)
    assert pol.plan([0], [4]) == [0]
    idle = 1
    while pol.plan([0], [4]) == [0]:
        idle += 1
    assert 1 < idle < 30
    lookup = DraftPolicy(4, 0.0, CPU, prior=NGramDraft().build(type("R", (), {"device": None})(), None).prior)
    lookup.admit(0)
    assert [lookup.plan([0], [4]) for _ in range(50)] == [[0]] * 50
    assert lookup.plan([0], [4], [True]) == [4]


def test_disabled_policy_drafts_the_caps():
    pol = DraftPolicy(4, 0.0, CPU, enabled=False)
    assert pol.plan([0, 1, 2], [4, 2, 9]) == [4, 2, 4]


def test_window_cost_interpolates_monotone_and_validates():
    c = WindowCost({1: 10.0, 2: 18.0, 4: 15.0, 8: 30.0})  # timing noise: 4 measured below 2
    assert [c(t) for t in (1, 2, 3, 4, 6, 8, 12)] == pytest.approx([1.0, 1.8, 1.8, 1.8, 2.4, 3.0, 4.2])
    for bad in ({2: 1.0}, {1: 0.0}, {1: 1.0, 0: 1.0}):
        with pytest.raises(ValueError, match="window_cost"):
            WindowCost(bad)


def test_generator_measures_the_cost_or_takes_a_table():
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, draft=NGramDraft(k=4))
    pts = dict(gen.speculative.policy.cost.points)
    assert sorted(pts) == [1, 2, 4, 8, 10] and pts[1] == 1.0  # up to 2 rows x (k + 1)
    assert all(a <= b for a, b in zip(list(pts.values()), list(pts.values())[1:], strict=False))
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, draft=NGramDraft(k=4),
                         window_cost={1: 2.0, 8: 3.0})
    assert gen.speculative.policy.cost(8) == 1.5
    with pytest.raises(ValueError, match="window_cost"):
        TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, draft=NGramDraft(k=4),
                       window_cost={4: 1.0})
