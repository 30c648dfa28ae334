"""DraftPolicy and WindowCost (issue 19): the plan maximises expected tokens per unit of
verification cost (oracle: a brute-force search over every draft-length vector), break-even
follows the measured cost, and the generator measures the cost when it is built."""

from __future__ import annotations

import itertools
import random

import pytest
from _models import tiny_model, word_tokenizer

from decodekit import NGramDraft, TokenGenerator
from decodekit.speculative.policy import CONFIDENT_HIT, DENSE_WIDTHS, DraftPolicy, WindowCost

CPU = WindowCost({1: 1.0, 2: 1.8, 17: 2.0, 64: 5.0})  # SmolLM2 fp32 on 2 cores, roughly
GPU = WindowCost({1: 1.0, 64: 1.1, 256: 1.6})  # bandwidth-bound decode


def _value(lengths, hg, cost, draft_cost=0.0, rows=None):
    """Expected tokens per unit of cost of a plan, by direct summation; the window is
    rectangular (every row padded to the longest draft; ``rows`` computed, idle ones too)."""
    B, L = len(lengths), max(lengths)
    n = rows or B
    expected = B + sum(sum(h * g ** (j - 1) for j in range(1, n_ + 1))
                       for n_, (h, g) in zip(lengths, hg, strict=True))
    if rows is None:  # a one-row table: rows x width priced as tokens
        return expected / (cost(B * (L + 1)) + draft_cost * L * cost(B))
    return expected / (cost[(n, L + 1)] + draft_cost * L * cost[(n, 1)])


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


def test_plan_prices_rows_and_width():
    """With a (rows, width) table the plan is the best length vector when the window's cost
    is the table's entry for the rows the step computes (idle slots below the highest
    included); the oracle reads the table directly (every queried shape is a measured one)."""
    rng = random.Random(2)
    differs = 0
    for _ in range(200):
        B, k = rng.randint(1, 3), rng.randint(1, 4)
        rows = B + rng.randint(0, 2)
        table = {}
        for n in range(1, rows + 1):  # a random cost growing in rows and width
            prev = 0.0
            for w in range(1, k + 2):
                prev = max(prev, table.get((n - 1, w), 0.0)) + rng.random() + 0.05
                table[(n, w)] = prev
        table = {key: c / table[(1, 1)] for key, c in table.items()}
        cost = WindowCost(table)
        assert all(cost(n, w) == pytest.approx(c) for (n, w), c in cost.points)
        pol = _policy(k, cost, [[(k, rng.randint(0, k))] for _ in range(B)])
        caps = [rng.randint(0, k) for _ in range(B)]
        hg = [pol.acceptance(s) for s in range(B)]
        plan = pol.plan(list(range(B)), caps, rows=rows)
        priced = {key: cost(*key) for key in table}
        best = max(_value(v, hg, priced, rows=rows) for v in itertools.product(*(range(c + 1) for c in caps)))
        assert _value(plan, hg, priced, rows=rows) >= best * (1 - 1e-9), (plan, caps, hg)
        differs += plan != pol.plan(list(range(B)), caps)  # the idle rows change the answer
    assert differs > 5


def test_window_cost_by_rows_and_width():
    """A (rows, width) table: exact at its points, linear between widths and between rows,
    never cheaper with more rows or positions (noise), extrapolated linearly; an int key is one
    row; a one-row table prices rows x width as tokens."""
    c = WindowCost({(1, 1): 10.0, (1, 8): 20.0, (4, 1): 12.0, (4, 8): 40.0, (8, 1): 11.0, (8, 8): 60.0})
    assert c(1, 1) == 1.0 and c(4, 8) == 4.0 and c(8, 8) == 6.0
    assert c(1, 4) == pytest.approx(1 + 3 / 7)  # between widths
    assert c(2, 8) == pytest.approx(2 + 2 * (1 / 3))  # between rows: 2.0 at 1 row, 4.0 at 4
    assert c(8, 1) == 1.2  # measured 1.1 below 4 rows' 1.2: raised
    assert c(16, 8) == pytest.approx(6 + 2 * 8 / 4)  # beyond the last row: linear
    assert c(3) == c(1, 3)
    flat = WindowCost({1: 1.0, 2: 1.8, 16: 4.0})
    assert flat(4, 4) == flat(16) == 4.0 and flat(2, 1) == 1.8
    for bad in ({(1, 1): 1.0, (0, 2): 1.0}, {(1, 1): 1.0, (1, 2, 3): 1.0}, {(2, 1): 1.0}):
        with pytest.raises(ValueError, match="window_cost"):
            WindowCost(bad)


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


def test_evidence_classes_pool_their_acceptance_over_requests():
    """A class whose drafts usually pass lifts the h of a request with a poor history (and of a
    new one); a class of mostly wrong guesses does not; the pooled counts decay and a failed
    call's snapshot restores them."""
    pol = DraftPolicy(8, 0.0, CPU, prior=(0.15, 0.8))
    for s in range(3):
        pol.admit(s)
    for _ in range(6):
        pol.update(0, 8, 0, evidence=1)  # one-token guesses of request 0: rejected
    for _ in range(9):
        pol.update(1, 8, 6, evidence=5)  # three agreeing tokens, request 1: accepted
    h_poor = pol.acceptance(0)[0]
    assert h_poor < 0.1
    assert pol.acceptance(0, evidence=1)[0] == h_poor  # the guesses' class is no better
    lifted = (0.97 ** 8 * sum(0.97 ** -i for i in range(9)) + 2 * 0.15) / (
        0.97 ** 8 * sum(0.97 ** -i for i in range(9)) + 2)
    assert pol.acceptance(0, evidence=5)[0] == pytest.approx(lifted)
    assert pol.acceptance(2, evidence=5)[0] == pytest.approx(lifted)  # a request that never drafted
    assert pol.acceptance(2, evidence=3)[0] == pytest.approx(0.15)  # an unseen class: the prior
    assert pol.plan([0], [8]) == [0] and pol.plan([0], [8], evidence=[5])[0] > 0
    snap = pol.snapshot([0])
    pol.update(0, 8, 0, evidence=5)
    assert pol.acceptance(2, evidence=5)[0] < lifted
    pol.restore(snap)
    assert pol.acceptance(2, evidence=5)[0] == pytest.approx(lifted)


def test_a_wide_window_takes_the_request_record_with_the_class():
    """At one row a class's pooled record lifts a request whose own drafts of that class fail
    (optimistic: a few positions cost little more than a step); a window of more than one row
    takes the request's own decayed record with the class around the pooled one instead, so
    a row that keeps failing on a class the others pass no longer widens the batch's window.
    Steps without a draft pull that record back to the pool; a failed call's snapshot restores
    it; admit forgets it."""
    cost = WindowCost({(1, 1): 1.0, (1, 2): 1.8, (1, 17): 3.0, (2, 1): 1.2, (2, 2): 2.2, (2, 17): 3.0})
    pol = DraftPolicy(16, 0.0, cost, prior=(0.15, 0.8), evidence_prior={8: 0.9})
    pair = dict(confident=[True, False], evidence=[8, 0])  # request 0 with a class-8 match, 4 without
    for s in range(5):
        pol.admit(s)
    for _ in range(10):
        pol.update(1, 16, 16, evidence=8)  # requests 1 and 2 copy: class 8 passes
        pol.update(2, 16, 16, evidence=8)
    for _ in range(6):
        pol.update(0, 16, 0, evidence=8)  # request 0's class-8 drafts fail
    pooled = pol.acceptance(3, evidence=8)[0]
    assert pooled > 0.7 and pol.acceptance(0, evidence=8)[0] == pooled  # one row: the larger
    assert pol.acceptance(0, evidence=8, own=True)[0] < 0.4 < pooled
    assert pol.acceptance(3, evidence=8, own=True)[0] == pytest.approx(pooled)  # no record yet
    assert pol.plan([0], [16], [True], evidence=[8])[0] > 0  # alone: drafts on the pooled record
    assert pol.plan([0, 4], [16, 16], **pair) == [0, 0]  # two rows: its own record says no
    assert pol.plan([3, 4], [16, 16], **pair)[0] > 0  # control: a request without that record drafts
    before = pol.acceptance(0, evidence=8, own=True)[0]
    snap = pol.snapshot([0])
    pol.update(0, 16, 0, evidence=8)
    assert pol.acceptance(0, evidence=8, own=True)[0] < before
    pol.restore(snap)
    assert pol.acceptance(0, evidence=8, own=True)[0] == pytest.approx(before)
    idle = 1
    while pol.plan([0, 4], [16, 16], **pair) == [0, 0]:
        idle += 1
    assert 1 < idle < 12
    pol.admit(0)
    assert pol.acceptance(0, evidence=8, own=True)[0] == pytest.approx(pol.acceptance(3, evidence=8)[0])


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
    # one row: every width up to k + 1 (small products are lumpy on CPUs); max_batch_size rows:
    # widths 1, 2 and k + 1 (4, just below 5, left out)
    assert sorted(pts) == [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (2, 1), (2, 2), (2, 5)]
    assert pts[(1, 1)] == 1.0
    assert all(pts[(1, w)] <= pts[(1, w + 1)] for w in range(1, 5))
    assert all(pts[(2, a)] <= pts[(2, b)] for a, b in ((1, 2), (2, 5)))
    assert all(pts[(1, w)] <= pts[(2, w)] for w in (1, 2, 5))
    wide = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64,
                          draft=NGramDraft(k=DENSE_WIDTHS))  # wider than DENSE_WIDTHS: sparse again
    assert [w for (_, w), _c in wide.speculative.policy.cost.points] == [1, 2, 4, 8, 16, DENSE_WIDTHS + 1]
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, draft=NGramDraft(k=4),
                         window_cost={1: 2.0, 8: 3.0})
    assert gen.speculative.policy.cost(8) == 1.5
    with pytest.raises(ValueError, match="window_cost"):
        TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, draft=NGramDraft(k=4),
                       window_cost={4: 1.0})


def test_evidence_classes_start_from_their_own_prior():
    """A drafter's per-class priors: an unseen class starts from its own first-token acceptance
    (prompt lookup: three tokens agreeing at the anchor draft at once, a one-token guess
    elsewhere does not), evidence pulls it away; out-of-range priors are refused by name."""
    from decodekit.speculative.ngram import EVIDENCE_PRIOR

    pol = DraftPolicy(8, 0.0, CPU, prior=(0.15, 0.8), evidence_prior=EVIDENCE_PRIOR)
    pol.admit(0)
    assert pol.acceptance(0, evidence=6)[0] == pytest.approx(EVIDENCE_PRIOR[6])
    assert pol.acceptance(0, evidence=1)[0] == pytest.approx(0.15)
    assert pol.plan([0], [8], evidence=[6])[0] > 0 and pol.plan([0], [8], evidence=[1]) == [0]
    plain = DraftPolicy(8, 0.0, CPU, prior=(0.15, 0.8))
    plain.admit(0)
    assert plain.plan([0], [8], evidence=[6]) == [0]  # control: without class priors it waits
    for _ in range(6):
        pol.update(0, 8, 0, evidence=6)
    assert pol.acceptance(0, evidence=6)[0] < 0.3
    with pytest.raises(ValueError, match=r"evidence_prior\[3\]"):
        DraftPolicy(8, 0.0, CPU, evidence_prior={3: 1.5})


def test_wide_windows_calibrate_the_estimates_by_what_they_accepted():
    """Windows of more than one row scale every row's expected tokens by the batch's accepted /
    predicted tokens over recent multi-row verifications: rows whose estimates stay high (the
    drafter is confident) but whose drafts fail stop widening the window after a few steps,
    while one row alone (optimistic, uncalibrated) still drafts. Steps without a draft bring
    the scale back towards 1 so the batch tries again; a failed call's snapshot restores it."""
    cost = WindowCost({(1, 1): 1.0, (1, 2): 1.2, (1, 17): 3.0, (2, 1): 1.2, (2, 2): 1.6, (2, 17): 5.0})
    pol = DraftPolicy(16, 0.0, cost, prior=(0.6, 0.6))
    for s in range(2):
        pol.admit(s)
    sure = dict(confident=[True, True])
    assert pol.plan([0, 1], [16, 16], **sure)[0] > 0  # confident: h >= 0.9 on both rows
    failed = 0
    while (plan := pol.plan([0, 1], [16, 16], **sure))[0] > 0:
        snap = pol.snapshot([0, 1])
        for s, d in zip((0, 1), plan, strict=True):
            pol.update(s, d, 0)  # every draft rejected at once
        failed += 1
        assert failed < 12, "the batch keeps drafting although nothing is accepted"
    assert failed >= 2  # one failure is not enough evidence (the prior weight)
    assert pol.acceptance(0, confident=True)[0] >= 0.9  # the estimate itself stayed high
    assert pol.plan([0], [16], [True])[0] > 0  # one row: no calibration
    pol.restore(snap)  # the state before the last failed verification drafts again
    assert pol.plan([0, 1], [16, 16], **sure)[0] > 0
    pol.update(0, 16, 0)
    pol.update(1, 16, 0)
    idle = 0
    while pol.plan([0, 1], [16, 16], **sure)[0] == 0:
        idle += 1
        assert idle < 40, "the calibration never drifts back"
    assert idle >= 1


def test_rows_with_nothing_to_draft_do_not_widen_the_window():
    """A row whose drafter has nothing to propose this step (prompt lookup without a match)
    counts for no expected tokens: two rows that each could draft pay for a window, one
    alone does not, so the step stays plain instead of verifying a draft the window's cost
    was justified by a row that never had one."""
    from types import SimpleNamespace

    from decodekit import SamplingParams
    from decodekit.speculative.step import SpeculativeStep

    class Lookup:  # what a drafter says before drafting: only slot 0 has a match
        cost, prior = 0.0, (0.5, 0.8)

        def confident(self, slot, tokens):
            return False

        def evidence(self, slot, tokens):
            return 0

        def available(self, slot, tokens):
            return 16 if slot == 0 else 0

    cost = WindowCost({(1, 1): 1.0, (1, 4): 1.5, (2, 1): 1.2, (2, 4): 2.2, (2, 17): 4.0})
    runner = SimpleNamespace(step_rows=lambda slots: max(slots) - min(slots) + 1,
                             window_packed=lambda slots: False)  # (padded windows: what this is about)
    row = lambda slot: SimpleNamespace(slot=slot, params=SamplingParams(max_new_tokens=64),
                                       prompt_token_ids=[1], speculate=True, length=2, guide=None)
    step = SpeculativeStep(Lookup(), runner, None, 16, DraftPolicy(16, 0.0, cost, prior=(0.5, 0.8)))
    both = DraftPolicy(16, 0.0, cost, prior=(0.5, 0.8)).plan([0, 1], [16, 16])
    assert both[0] > 0  # had both rows a draft, the window would pay
    assert step.requests([row(0), row(1)], [[1, 5], [1, 6]], 256) is None  # one has none: a plain step
    alone = step.requests([row(0)], [[1, 5]], 256)
    assert alone is not None and alone[0].budget > 0  # control: one row's window is cheap enough
