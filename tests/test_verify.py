"""Exact speculative verification: kernel parity with the torch reference, the emitted
tokens' distribution against the target (chi-square, with a negative control that the
same test rejects), acceptance rules for greedy rows and a perfect drafter."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE
from scipy import stats

from decodekit import Sampler, SamplingParams, processed_probs
from decodekit.sampling import verify, verify_reference


def _dists(V: int, seed: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A target p and a draft q over V tokens; kinds exercise filtering and disjoint support."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(V, generator=g) * 1.5
    lq = torch.randn(V, generator=g) * 1.5
    if kind == "top_p":  # the target keeps 70% of its mass; q spreads over the rest too
        p = processed_probs(lp[None], SamplingParams(top_p=0.7))[0]
    elif kind == "min_p":
        p = processed_probs(lp[None], SamplingParams(min_p=0.05))[0]
    else:
        p = torch.softmax(lp, -1)
    # The drafter over-proposes the target's favourite and spreads the rest, also over
    # tokens the target filtered out: rejections are frequent, and the residual
    # max(p - q, 0) differs a lot from p, so the negative control has power.
    q = 0.5 * torch.nn.functional.one_hot(p.argmax(), V).float() + 0.5 * torch.softmax(lq, -1)
    return p, q


def _draw_first_two(p0, p1, q0, q1, n, *, residual="exact", point_mass=False):
    """n independent verifications (seed = trial) of a 2-token draft drawn from q."""
    V = p0.shape[0]
    g = torch.Generator().manual_seed(1234)
    d0 = torch.multinomial(q0, n, replacement=True, generator=g)
    d1 = torch.multinomial(q1, n, replacement=True, generator=g)
    p = torch.stack([p0, p1, p1])[None].expand(n, 3, V)
    q = None if point_mass else torch.stack([q0, q1])[None].expand(n, 2, V)
    out, n_acc = verify_reference(p, q, torch.stack([d0, d1], 1), torch.full((n,), 2),
                                  torch.arange(n), torch.zeros(n, dtype=torch.long),
                                  residual=residual)
    return out, n_acc


def _pvalue(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    V = expected.shape[0]
    obs = torch.bincount(tokens, minlength=V).double()
    n = obs.sum()
    if bool((obs[expected == 0] > 0).any()):
        return 0.0  # a token of probability zero was emitted
    exp = expected.double() * n
    big = exp >= 5
    o = torch.cat([obs[big], obs[~big].sum(0, keepdim=True)])
    e = torch.cat([exp[big], exp[~big].sum(0, keepdim=True)])
    keep = e > 0
    o, e = o[keep], e[keep]
    return float(stats.chisquare(o.numpy(), (e * (o.sum() / e.sum())).numpy()).pvalue)


def _check(kind: str, n: int, point_mass: bool, residual: str) -> tuple[float, float]:
    V = 24
    p0, q0 = _dists(V, 1, kind)
    p1, q1 = _dists(V, 2, kind)
    out, n_acc = _draw_first_two(p0, p1, q0, q1, n, residual=residual, point_mass=point_mass)
    first = out[:, 0]
    second = out[n_acc >= 1, 1]  # emitted whenever the first draft was accepted
    return _pvalue(first, p0), _pvalue(second, p1)


CASES = [("plain", False), ("top_p", False), ("min_p", False), ("plain", True), ("top_p", True),
         ("min_p", True)]


@pytest.mark.slow
@pytest.mark.parametrize("kind, point_mass", CASES)
def test_emitted_tokens_follow_the_target_200k(kind, point_mass):
    pv1, pv2 = _check(kind, 200_000, point_mass, "exact")
    assert pv1 > 1e-4 and pv2 > 1e-4, (pv1, pv2)


@pytest.mark.slow
@pytest.mark.parametrize("kind, point_mass", CASES)
def test_negative_control_resampling_from_p_is_rejected_200k(kind, point_mass):
    pv1, _ = _check(kind, 200_000, point_mass, "p")
    assert pv1 < 1e-6, pv1


@pytest.mark.parametrize("residual, ok", [("exact", True), ("p", False)])
def test_emitted_tokens_follow_the_target_fast(residual, ok):
    pv1, pv2 = _check("top_p", 30_000, False, residual)
    if ok:
        assert pv1 > 1e-4 and pv2 > 1e-4, (pv1, pv2)
    else:
        assert pv1 < 1e-6, pv1


@pytest.mark.parametrize("point_mass", [False, True])
@pytest.mark.parametrize("K", [1, 4])
def test_kernel_matches_reference(point_mass, K):
    B, V = 24, 300
    g = torch.Generator().manual_seed(K)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * 2, -1)
    p[:3] = torch.nn.functional.one_hot(p[:3].argmax(-1), V).float()  # greedy rows
    p[3:6, :, ::3] = 0.0  # filtered targets
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * 2, -1)
    q[6:9] = p[6:9, :K]  # perfect drafters
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, K)
    nd = torch.randint(0, K + 1, (B,), generator=g)
    seed = torch.arange(B) * 7919
    pos = torch.randint(0, 1000, (B,), generator=g)
    qq = None if point_mass else q
    want = verify_reference(p, qq, draft, nd, seed, pos)
    dev = KERNEL_DEVICE
    got = verify(p.to(dev), None if qq is None else qq.to(dev), draft.to(dev), nd.to(dev),
                 seed.to(dev), pos.to(dev), backend="triton")
    assert got[0].cpu().tolist() == want[0].tolist()
    assert got[1].cpu().tolist() == want[1].tolist()
    # structure: n_acc accepted drafts, then one emitted token, then padding
    for b in range(B):
        a = int(want[1][b])
        assert want[0][b, :a].tolist() == draft[b, :a].tolist()
        assert want[0][b, a] >= 0 and (want[0][b, a + 1:] == -1).all()
        assert p[b, a, want[0][b, a]] > 0  # never a token the target filtered out


def test_perfect_drafter_accepts_everything_and_greedy_accepts_the_argmax():
    B, K, V = 200, 4, 40
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)
    draft = torch.multinomial(p[:, :K].reshape(-1, V), 1, generator=g).reshape(B, K)
    out, n_acc = verify_reference(p, p[:, :K], draft, torch.full((B,), K), torch.arange(B),
                                  torch.zeros(B, dtype=torch.long))
    assert (n_acc == K).all() and (out[:, :K] == draft).all() and (out[:, K] >= 0).all()
    onehot = torch.nn.functional.one_hot(p.argmax(-1), V).float()
    greedy_draft = p[:, :K].argmax(-1)
    greedy_draft[:, 2] = (greedy_draft[:, 2] + 1) % V  # third draft is wrong
    out, n_acc = verify_reference(onehot, None, greedy_draft, torch.full((B,), K),
                                  torch.arange(B), torch.zeros(B, dtype=torch.long))
    assert (n_acc == 2).all()
    assert (out[:, 2] == p[:, 2].argmax(-1)).all()  # the correction is the argmax


def test_bad_inputs():
    p = torch.full((2, 3, 5), 0.2)
    with pytest.raises(ValueError, match="n_draft"):
        verify(p, None, torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 0]),
               torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="K\\+1"):
        verify(p, None, torch.zeros(2, 3, dtype=torch.long), torch.tensor([1, 0]),
               torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_greedy_verification_equals_the_full_path():
    """verify_greedy (two torch ops) gives the tokens and counts of window_probs + verify for
    plain greedy rows, with ties, NaN and partial draft counts; rows that need processing
    (a penalty) take the full path (None)."""
    V, R, K = 50, 4, 5
    sp = Sampler(V, R, "cpu", backend="torch")
    for s in range(R):
        sp.add(s, SamplingParams(temperature=0))
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(R, K + 1, V, generator=g)
        logits[0, 2, 7] = logits[0, 2, 3] = logits[0, 2].max() + 1  # a tie: the first index wins
        logits[1, 1, 4] = float("nan")
        top = logits.nan_to_num(nan=-3e38).argmax(-1)
        drafts = torch.randint(0, V, (R, K), generator=g)
        agree = torch.rand(R, K, generator=g) < 0.7
        drafts = torch.where(agree, top[:, :K], drafts)
        n_draft = torch.randint(0, K + 1, (R,), generator=g)
        drafts = torch.where(torch.arange(K) < n_draft[:, None], drafts, -1)
        fast = sp.verify_greedy(logits, list(range(R)), drafts, n_draft)
        p = sp.window_probs(logits, list(range(R)), drafts)
        full = sp.verify(p, None, drafts, n_draft, list(range(R)))
        assert fast is not None
        assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1]), trial
    sp.remove(3)
    sp.add(3, SamplingParams(temperature=0, repetition_penalty=1.3))
    assert sp.verify_greedy(logits, list(range(R)), drafts, n_draft) is None


def test_point_mass_verification_equals_the_full_path():
    """verify_point_masses (the drafts' probabilities only, one distribution per request)
    gives the tokens and counts of window_probs + verify with q=None bit for bit: mixed
    greedy / sampled / filtered / penalised / bad-word rows, a guided mask, drafts that are
    often accepted, partial draft counts, rows drafting nothing."""
    V, R, K = 300, 6, 5
    sp = Sampler(V, R, "cpu", backend="torch", eos_token_ids=[1])
    settings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, seed=3),
        SamplingParams(temperature=1.0, top_p=0.8, seed=4),
        SamplingParams(temperature=0.9, top_k=20, min_p=0.02, seed=5),
        SamplingParams(temperature=1.2, typical_p=0.9, repetition_penalty=1.3, frequency_penalty=0.2,
                       seed=6, min_new_tokens=3),
        SamplingParams(temperature=0.8, bad_words_token_ids=[[5, 6], [7]], presence_penalty=0.5, seed=7),
    ]
    for s, params in enumerate(settings):
        sp.add(s, params, prompt_token_ids=[5, 9, 9, 11])
    slots = list(range(R))
    g = torch.Generator().manual_seed(0)
    words = -(-V // 32)
    accepted = 0
    for trial in range(40):
        logits = torch.randn(R, K + 1, V, generator=g) * 2.5
        p = sp.window_probs(logits, slots, torch.full((R, K), -1))
        likely = torch.multinomial(p[:, :K].reshape(-1, V), 1, generator=g).view(R, K)
        other = torch.randint(0, V, (R, K), generator=g)
        drafts = torch.where(torch.rand(R, K, generator=g) < 0.8, likely, other)
        n_draft = torch.randint(0, K + 1, (R,), generator=g)
        n_draft[trial % R] = K
        drafts = torch.where(torch.arange(K) < n_draft[:, None], drafts, -1)
        mask = None
        if trial % 4 == 3:  # a grammar allowing about 3/4 of the tokens (the drafts too)
            allowed = torch.rand(R * (K + 1), V, generator=g) < 0.75
            allowed[:, drafts.clamp(min=0).flatten()] = True
            bits = torch.zeros(R * (K + 1), words * 32, dtype=torch.int64)
            bits[:, :V] = allowed.long()
            mask = (bits.view(-1, words, 32) << torch.arange(32)).sum(-1)
            mask = torch.where(mask >= 2**31, mask - 2**32, mask).to(torch.int32)
        fast = sp.verify_point_masses(logits, slots, drafts, n_draft, mask=mask)
        p = sp.window_probs(logits, slots, drafts, mask=mask)
        full = sp.verify(p, None, drafts, n_draft, slots)
        assert fast is not None
        assert torch.equal(fast[0], full[0]) and torch.equal(fast[1], full[1]), trial
        accepted += int(fast[1].sum())
        sp.accept(slots, fast[0])  # move the counters, penalties and histories on
    assert accepted > 40  # the likely drafts are often accepted: both rules were exercised
    with pytest.raises(ValueError, match="n_draft"):
        sp.verify_point_masses(logits, slots, drafts, torch.full((R,), K + 1))


def test_race_over_few_positive_weights_is_the_dense_race():
    """The CPU race draws noise only for positive weights when few are (filtered rows): the
    same winners as the dense race over every token, ties going to the first index, and 0
    for a row without positive weight."""
    from decodekit.sampling.reference import _race, exponential_noise

    g = torch.Generator().manual_seed(1)
    N, V = 64, 500
    w = torch.rand(N, V, generator=g)
    w = torch.where(torch.rand(N, V, generator=g) < 0.05, w, 0.0)  # ~5% positive: the sparse path
    w[3] = 0.0
    w[4, 10] = w[4, 20] = 1e30  # equal weights: the noise decides
    seed = torch.randint(0, 2**62, (N,), generator=g)
    pos = torch.randint(0, 1000, (N,), generator=g)
    E = exponential_noise(seed, pos, V)
    dense = torch.where(w > 0, w / E, -1.0).argmax(-1)
    assert torch.equal(_race(w, seed, pos), dense)
    assert int((w > 0).sum()) * 4 < N * V and int(dense[3]) == 0
