"""Statistical tests of the sampler's draws.

Draws come from the torch reference (:func:`decodekit.sampling.reference.sample_from_logits`),
whose randomness is a counter-based hash of (seed, position): ``N`` rows with ``N``
consecutive seeds at one position are ``N`` independent draws from the processed
distribution. Their histogram is tested (chi-square goodness of fit) against the
*oracle* distribution from transformers' processors (``_helpers.oracle_probs``), never
against decodekit's own probabilities. Every configuration has negative controls: the
same test run against a deliberately wrong expected distribution must reject.

All seeds are fixed, so the outcomes are deterministic; the thresholds (accept at
p > 1e-4, reject at p < 1e-6) only say how far from the boundary they are.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from _helpers import oracle_probs
from scipy import stats

import decodekit
from decodekit import Sampler, SamplingParams
from decodekit.sampling.reference import (
    RowState,
    exponential_from_bits,
    exponential_noise,
    processed_probs_from_logits,
    sample_from_logits,
)

INF = math.inf
V = 64
CHUNK = 50_000
N_SLOW = 200_000
N_FAST = 20_000
P_ACCEPT = 1e-4
P_REJECT = 1e-6


def _make_logits() -> torch.Tensor:
    """One moderately peaked row: gaussian * 1.5 with three tokens lifted by 2."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(V, generator=g) * 1.5
    x[torch.randperm(V, generator=g)[:3]] += 2.0
    return x


LOGITS = _make_logits()
TOP = LOGITS.topk(10).indices.tolist()
# Likely tokens in the prompt and the output, so that every penalty changes the result.
PROMPT = [TOP[0], TOP[2], TOP[4], 5, 9]
OUTPUT = [TOP[1], TOP[1], TOP[3], 11]


@dataclass(frozen=True)
class Request:
    params: SamplingParams
    prompt: tuple[int, ...] = tuple(PROMPT)
    output: tuple[int, ...] = tuple(OUTPUT)

    def oracle(self) -> np.ndarray:
        p = oracle_probs(LOGITS, self.params, list(self.prompt), list(self.output))
        return p.double().numpy()


CONFIGS: dict[str, SamplingParams] = {
    "temperature": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=1.1, top_k=12),
    "top_p": SamplingParams(top_p=0.7),
    "min_p": SamplingParams(temperature=1.2, min_p=0.1),
    "typical": SamplingParams(temperature=1.3, typical_p=0.5),
    "combined": SamplingParams(
        temperature=0.9, top_k=30, top_p=0.9, min_p=0.02, typical_p=0.95,
        repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=-0.3,
        logit_bias={TOP[7]: 2.0, TOP[5]: -INF, 40: -1.5},
    ),
}

# (config, label) -> the wrong request whose oracle must be rejected by the draws of config.
WRONG: dict[tuple[str, str], Callable[[Request], Request]] = {
    ("temperature", "temperature+10%"):
        lambda r: Request(r.params.replace(temperature=r.params.temperature * 1.1)),
    ("temperature", "temperature+3%"):
        lambda r: Request(r.params.replace(temperature=r.params.temperature * 1.03)),
    ("top_k", "top_k+1"): lambda r: Request(r.params.replace(top_k=r.params.top_k + 1)),
    ("top_k", "top_k-1"): lambda r: Request(r.params.replace(top_k=r.params.top_k - 1)),
    ("top_p", "top_p=0.75"): lambda r: Request(r.params.replace(top_p=0.75)),
    ("top_p", "unfiltered"): lambda r: Request(r.params.replace(top_p=1.0)),
    ("min_p", "min_p=0.08"): lambda r: Request(r.params.replace(min_p=0.08)),
    ("typical", "typical_p=0.6"): lambda r: Request(r.params.replace(typical_p=0.6)),
    ("combined", "presence_sign_flipped"):
        lambda r: Request(r.params.replace(presence_penalty=-r.params.presence_penalty)),
    ("combined", "repetition_ignores_prompt"):
        lambda r: Request(r.params, prompt=()),
}


# --------------------------------------------------------------------------- draws
def row_state(req: Request, seeds: torch.Tensor) -> RowState:
    """The RowState of ``len(seeds)`` copies of one request (documented layout of
    :class:`RowState`), each with its own seed."""
    p, n = req.params, seeds.shape[0]

    def full(v, dtype=torch.float32):
        return torch.full((n,), v, dtype=dtype)

    st = RowState(
        temperature=full(p.temperature), top_k=full(p.effective_top_k(V), torch.int32),
        top_p=full(p.top_p), min_p=full(p.min_p), typical_p=full(p.typical_p),
        repetition_penalty=full(p.repetition_penalty),
        frequency_penalty=full(p.frequency_penalty), presence_penalty=full(p.presence_penalty),
        seed=seeds.to(torch.int64), n_gen=full(len(req.output), torch.int32),
        min_new=full(0, torch.int32),
    )
    if p.logit_bias or p.allowed_token_ids is not None or p.bad_words_token_ids:
        bias = torch.zeros(V)
        if p.allowed_token_ids is not None:
            bias[:] = -INF
            bias[list(p.allowed_token_ids)] = 0.0
        for t, b in (p.logit_bias or {}).items():
            if bias[t] != -INF:
                bias[t] = b
        for word in p.bad_words_token_ids or ():
            assert len(word) == 1
            bias[word[0]] = -INF
        st.bias = bias.expand(n, V)
    if p.uses_penalties:
        counts = torch.zeros(V, dtype=torch.int32)
        counts[list(req.prompt)] = 1
        counts += 2 * torch.bincount(torch.tensor(req.output, dtype=torch.long),
                                     minlength=V).to(torch.int32)
        st.counts = counts.expand(n, V)
    return st


def draw_tokens(req: Request, seeds: torch.Tensor, position: int | None = None) -> torch.Tensor:
    """One token per seed (int64 [N]), drawn in chunks of CHUNK rows."""
    out = []
    for s in seeds.split(CHUNK):
        pos = None if position is None else torch.full_like(s, position)
        tok, _, _ = sample_from_logits(LOGITS.expand(s.shape[0], V), row_state(req, s), pos)
        out.append(tok)
    return torch.cat(out)


@functools.cache
def draw_counts(name: str, n: int) -> np.ndarray:
    """Histogram of n draws of config ``name`` (cached: the negative controls reuse it)."""
    base = zlib.crc32(name.encode()) << 24  # a different seed range per configuration
    tok = draw_tokens(Request(CONFIGS[name]), torch.arange(base, base + n))
    assert tok.min() >= 0 and tok.max() < V
    return np.bincount(tok.numpy(), minlength=V)


# --------------------------------------------------------------------------- the test
@dataclass(frozen=True)
class Gof:
    pvalue: float       # 0.0 when a token of expected probability 0 was drawn
    chi2_pvalue: float  # chi-square over the tokens of positive expected probability
    impossible: int     # draws of tokens whose expected probability is exactly 0
    bins: int


def goodness_of_fit(counts: np.ndarray, probs: np.ndarray) -> Gof:
    """Chi-square of ``counts`` against ``probs``: one bin per token with expected count
    >= 5, the rest pooled (into the smallest bin when the pool itself is under 5)."""
    counts = np.asarray(counts, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    assert probs.min() >= 0 and abs(probs.sum() - 1) < 1e-5, probs.sum()
    zero = probs == 0
    impossible = int(counts[zero].sum())
    n = counts[~zero].sum()
    expected = n * probs / probs.sum()
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    small = ~big & ~zero
    if small.any():
        o, e = counts[small].sum(), expected[small].sum()
        if e >= 5 or not exp:
            obs.append(o)
            exp.append(e)
        else:
            i = int(np.argmin(exp))
            obs[i] += o
            exp[i] += e
    chi2_p = 1.0 if len(obs) < 2 else float(stats.chisquare(obs, exp).pvalue)
    return Gof(0.0 if impossible else chi2_p, chi2_p, impossible, len(obs))


def check_config(name: str, n: int, wrong: str | None = None) -> None:
    """Positive test (``wrong`` None): draws of ``name`` fit the oracle. Negative control:
    the same draws against the oracle of ``WRONG[name, wrong]`` must be rejected."""
    req = Request(CONFIGS[name])
    right = req.oracle()
    counts = draw_counts(name, n)
    if wrong is None:
        res = goodness_of_fit(counts, right)
        assert res.impossible == 0, f"{name}: drew tokens of probability 0: " \
            f"{np.flatnonzero((right == 0) & (counts > 0)).tolist()}"
        assert res.bins >= 8, res  # a real multi-bin test, not a degenerate one
        assert res.pvalue > P_ACCEPT, f"{name}: chi-square p={res.pvalue:.3g} ({res})"
    else:
        expected = WRONG[name, wrong](req).oracle()
        tv = 0.5 * np.abs(expected - right).sum()
        assert tv > 0.01, f"negative control {wrong} is too close to the truth (TV={tv:.4f})"
        res = goodness_of_fit(counts, expected)
        assert res.pvalue < P_REJECT, f"{name} vs {wrong}: not rejected, p={res.pvalue:.3g}"


SLOW_CASES = [(name, None) for name in CONFIGS] + [(name, w) for name, w in WRONG]
# temperature+3% needs the 200k draws: at 20k it is (rightly) not rejected.
FAST_CASES = [c for c in SLOW_CASES
              if c[0] in ("temperature", "combined") and c[1] != "temperature+3%"]


def _ids(cases):
    return [f"{n}-{'positive' if w is None else 'wrong:' + w}" for n, w in cases]


@pytest.mark.slow
@pytest.mark.parametrize("name, wrong", SLOW_CASES, ids=_ids(SLOW_CASES))
def test_draws_fit_oracle_200k(name, wrong):
    check_config(name, N_SLOW, wrong)


@pytest.mark.parametrize("name, wrong", FAST_CASES, ids=_ids(FAST_CASES))
def test_draws_fit_oracle_20k(name, wrong):
    check_config(name, N_FAST, wrong)


def test_goodness_of_fit_helper():
    """The helper itself: exact multinomial draws pass, skewed/impossible ones do not."""
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.1999, 0.0001, 0.0])
    good = rng.multinomial(100_000, p)
    assert goodness_of_fit(good, p).pvalue > P_ACCEPT
    q = np.array([0.52, 0.28, 0.1999, 0.0001, 0.0])
    assert goodness_of_fit(rng.multinomial(100_000, q), p).pvalue < P_REJECT
    bad = good.copy()
    bad[4] = 1
    res = goodness_of_fit(bad, p)
    assert res.impossible == 1 and res.pvalue == 0.0


def test_row_state_encodes_the_request_like_the_sampler():
    """The hand-built RowState above describes the same request as the public API."""
    for name in CONFIGS:
        req = Request(CONFIGS[name])
        mine = processed_probs_from_logits(LOGITS[None], row_state(req, torch.zeros(1)))
        public = decodekit.processed_probs(LOGITS[None], req.params,
                                           prompt_token_ids=[list(req.prompt)],
                                           output_token_ids=[list(req.output)])
        torch.testing.assert_close(mine, public, atol=0, rtol=0)


@pytest.mark.parametrize("wrong", [None, "presence_sign_flipped"])
def test_public_api_draws_fit_oracle(wrong):
    """End to end through decodekit.sample: one row per seed (SamplingParams.seed)."""
    n = 4000
    req = Request(CONFIGS["combined"])
    params = [req.params.replace(seed=s) for s in range(10**6, 10**6 + n)]
    tok = decodekit.sample(LOGITS.expand(n, V).contiguous(), params,
                           prompt_token_ids=[list(req.prompt)] * n,
                           output_token_ids=[list(req.output)] * n)
    counts = np.bincount(tok.numpy(), minlength=V)
    expected = req.oracle() if wrong is None else WRONG["combined", wrong](req).oracle()
    res = goodness_of_fit(counts, expected)
    if wrong is None:
        assert res.impossible == 0 and res.pvalue > P_ACCEPT, res
    else:
        assert res.pvalue < P_REJECT, res


# --------------------------------------------------------------------------- (seed, position)
N_PAIRS = 50_000
SEEDS = torch.arange(7_000_000, 7_000_000 + N_PAIRS)
TEMP = Request(CONFIGS["temperature"])


def independence_pvalue(a: Sequence[int], b: Sequence[int]) -> float:
    """Chi-square test of independence of paired tokens; rare tokens pooled into one
    category so that every expected cell count is >= 5."""
    a, b = np.asarray(a), np.asarray(b)
    n = len(a)

    def categories(x):
        freq = np.bincount(x, minlength=V)
        keep = np.flatnonzero(freq >= 0.03 * n)  # each kept category has >= 3% of the draws
        cat = np.full(V, len(keep))
        cat[keep] = np.arange(len(keep))
        return cat[x], len(keep) + 1

    ca, ka = categories(a)
    cb, kb = categories(b)
    table = np.zeros((ka, kb))
    np.add.at(table, (ca, cb), 1)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    assert table.shape[0] >= 5 and table.shape[1] >= 5
    return float(stats.chi2_contingency(table).pvalue)


@pytest.mark.parametrize("pair", [
    "position_0_vs_1", "seed_s_vs_s+1", "seed_s_vs_s+2**32", "(s,0)_vs_(s-1,1)",
])
def test_draws_are_independent_across_seed_and_position(pair):
    seeds, base = SEEDS, draw_tokens(TEMP, SEEDS, position=0)
    other = {
        "position_0_vs_1": lambda: draw_tokens(TEMP, seeds, position=1),
        "seed_s_vs_s+1": lambda: draw_tokens(TEMP, seeds + 1, position=0),
        "seed_s_vs_s+2**32": lambda: draw_tokens(TEMP, seeds + 2**32, position=0),
        "(s,0)_vs_(s-1,1)": lambda: draw_tokens(TEMP, seeds - 1, position=1),
    }[pair]()
    # Not the same stream: agreement happens at the collision rate sum(p^2), no more.
    p = TEMP.oracle()
    rate, agree = float((p**2).sum()), float((base == other).double().mean())
    sd = math.sqrt(rate * (1 - rate) / N_PAIRS)
    assert abs(agree - rate) < 6 * sd, f"{pair}: agreement {agree:.4f}, expected {rate:.4f}"
    assert independence_pvalue(base.numpy(), other.numpy()) > P_ACCEPT, pair
    # Each stream on its own fits the oracle.
    for tok in (base, other):
        assert goodness_of_fit(np.bincount(tok.numpy(), minlength=V), p).pvalue > P_ACCEPT


def test_independence_test_rejects_dependent_pairs():
    """Negative controls of the independence test: identical and shifted-copy pairs."""
    base = draw_tokens(TEMP, SEEDS, position=0).numpy()
    assert independence_pvalue(base, base) < P_REJECT
    # half of the pairs copied, half independent
    other = draw_tokens(TEMP, SEEDS, position=1).numpy().copy()
    other[::2] = base[::2]
    assert independence_pvalue(base, other) < P_REJECT


def test_same_seed_and_position_give_the_same_token():
    seeds = torch.arange(123, 123 + 5000) * 7919
    for name in ("temperature", "combined"):
        req = Request(CONFIGS[name])
        a = draw_tokens(req, seeds, position=3)
        assert torch.equal(a, draw_tokens(req, seeds, position=3))
        # independent of batch order and batch size
        perm = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(0))
        assert torch.equal(a[perm], draw_tokens(req, seeds[perm], position=3))
        assert torch.equal(a[1000:1017], draw_tokens(req, seeds[1000:1017], position=3))
        # and it does depend on the position and on the seed
        assert (a != draw_tokens(req, seeds, position=4)).any()
        assert (a != draw_tokens(req, seeds + 1, position=3)).any()


def test_public_api_is_keyed_by_seed_and_position():
    """Same (seed, position) -> same token through Sampler slots and decodekit.sample."""
    n = 64
    params = [SamplingParams(seed=s * 1_000_003, temperature=1.5) for s in range(n)]
    logits = LOGITS.expand(n, V).contiguous()
    ref = decodekit.sample(logits, params, step=5)
    assert len(set(ref.tolist())) > 5  # different seeds, different tokens
    # step=5 and 5 already generated tokens are the same position (no penalties here)
    out5 = [[1, 2, 3, 4, 5]] * n
    assert torch.equal(ref, decodekit.sample(logits, params, output_token_ids=out5))
    assert not torch.equal(ref, decodekit.sample(logits, params, step=6))
    # slots and batch-mates do not matter: reversed slots in a bigger sampler
    s = Sampler(V, 2 * n, "cpu", backend="torch")
    slots = list(range(2 * n - 1, n - 1, -1))
    for slot, p in zip(slots, params, strict=True):
        s.add(slot, p)
    s.accept(slots, torch.zeros(n, 5, dtype=torch.int64))
    assert torch.equal(ref, s.sample(logits, slots).token_ids)
    # a batch of one
    s1 = Sampler(V, 1, "cpu", backend="torch")
    s1.add(0, params[17])
    s1.accept([0], torch.zeros(1, 5, dtype=torch.int64))
    assert int(s1.sample(logits[:1], [0]).token_ids) == int(ref[17])


def test_exponential_noise_is_exp1():
    """E ~ Exp(1) (KS test) with the right tails at both ends."""
    seed = torch.arange(4000, dtype=torch.int64) * 104729
    E = exponential_noise(seed, torch.full_like(seed, 3), 250).double().flatten().numpy()
    assert E.min() > 0 and np.isfinite(E).all()
    assert stats.kstest(E, "expon").pvalue > P_ACCEPT
    n = E.size
    for thresh, prob in [(1e-3, -math.expm1(-1e-3)), (1e-5, -math.expm1(-1e-5)),
                         (8.0, math.exp(-8.0))]:
        k = int((E < thresh).sum()) if thresh < 1 else int((E > thresh).sum())
        assert stats.binomtest(k, n, prob).pvalue > P_ACCEPT, (thresh, k, n * prob)


def test_exponential_from_bits_is_precise_at_both_ends():
    """E = -log((r + 1/2) 2^-32) to fp32 relative precision for every 32-bit r, including
    r near 2^32 where E ~ 1e-10 (a plain -log(u) in fp32 would give 0 there)."""
    edges = [0, 1, 2, 3, 1000, 2**24 - 1, 2**24, 2**24 + 1, 2**31 - 2, 2**31 - 1, 2**31,
             2**31 + 1, 2**32 - 2**25, 2**32 - 2**24 - 1, 2**32 - 2**20, 2**32 - 1000,
             2**32 - 3, 2**32 - 2, 2**32 - 1]
    rand = torch.randint(0, 2**32, (20_000,), generator=torch.Generator().manual_seed(5))
    r = torch.cat([torch.tensor(edges, dtype=torch.int64), rand])
    got = exponential_from_bits(r).double()
    want = torch.tensor([-math.log1p(-(2**32 - x - 0.5) / 2**32) if x >= 2**31
                         else -math.log((x + 0.5) / 2**32) for x in r.tolist()],
                        dtype=torch.float64)
    assert (got > 0).all() and torch.isfinite(got).all()
    rel = ((got - want).abs() / want).max().item()
    assert rel < 2e-6, rel
