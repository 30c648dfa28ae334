"""The speculative window API of the Sampler: window_probs / window_logprobs against the
sequential oracle (probs then accept per window position, then rollback: what the generator
did before), on both backends; the launch count of a window; verify and draw keyed by the
slots' seeds and step counters; a statistical test of draw with its negative control."""

from __future__ import annotations

import random

import decodekit.kernels.accept as KA
import decodekit.kernels.process as KP
import decodekit.kernels.select as KS
import numpy as np
import pytest
import torch
from conftest import KERNEL_DEVICE
from test_statistics import P_ACCEPT, P_REJECT, goodness_of_fit

from decodekit import Sampler, SamplingParams
from decodekit.sampling import reference as ref
from decodekit.sampling import verify_reference

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]
V = 64
EOS = 0
STOP = [9, 10]
BAD = [[3, 4], [5, 6, 7], [12, 12]]  # multi-token bad words the drafts run into
FEATURES = [
    dict(temperature=0.0),
    dict(temperature=0.8),
    dict(top_k=6),
    dict(top_p=0.8, min_p=0.02),
    dict(typical_p=0.7),
    dict(repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.4),
    dict(frequency_penalty=1.2, top_k=10),
    dict(min_new_tokens=2, stop_token_ids=STOP),
    dict(min_new_tokens=3, stop_token_ids=STOP, presence_penalty=1.0),
    dict(bad_words_token_ids=BAD),
    dict(bad_words_token_ids=BAD + [[11]], temperature=0.0, repetition_penalty=1.3),
    dict(logit_bias={1: 3.0, 2: -2.0}, bad_words_token_ids=BAD[:1], min_new_tokens=1),
]


@pytest.fixture(params=BACKENDS, ids=lambda b: b[0])
def backend(request):
    return request.param


def _requests(seed: int, R: int):
    """R random requests (1-3 features each, so that penalties, min_new_tokens, bad words,
    greedy rows and filters combine), their prompts (one longer than the bad-word ring),
    logits [R, W, V] with a likely head, and drafts [R, W-1] that hit bad-word prefixes,
    suppressed ids and repeats (-1 past a random draft count, once in the middle)."""
    rng = random.Random(seed)
    params, prompts = [], []
    for r in range(R):
        kw = {}
        for f in rng.sample(FEATURES, rng.randint(1, 3)):
            kw |= f
        params.append(SamplingParams(seed=1000 * seed + r, **kw))
        n = 150 if r == 0 else rng.randint(0, 6)
        prompts.append([rng.choice([3, 5, 6, 12, 1, 2, 20]) for _ in range(n)])
    W = 4
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(R, W, V, generator=g) * 2
    logits[:, :, :14] += 2.5  # the tokens of the bad words, stop ids and EOS are likely
    pool = [3, 4, 5, 6, 7, 12, 12, 9, 10, EOS, 1, 2, 11]
    drafts = torch.tensor([[rng.choice(pool) for _ in range(W - 1)] for _ in range(R)])
    for r in range(R):
        drafts[r, rng.randint(0, W - 1):] = -1 if rng.random() < 0.4 else drafts[r, W - 2:].clone()
    drafts[R - 1, 1] = -1  # a hole: later drafts still count
    return params, prompts, logits, drafts


def _sampler(backend, params, prompts, slots) -> Sampler:
    name, dev = backend
    s = Sampler(V, 8, dev, backend=name, eos_token_ids=[EOS])
    for slot, p, prompt in zip(slots, params, prompts, strict=True):
        s.add(slot, p, prompt)
    return s


def _sequential(s: Sampler, logits, slots, drafts, fn):
    """The oracle: ``fn`` (probs or processed_logprobs) at each window position after
    accepting the earlier drafts one by one, then rollback."""
    out = []
    W = logits.shape[1]
    for j in range(W):
        out.append(fn(logits[:, j].contiguous(), slots))
        if j < W - 1:
            s.accept(slots, drafts[:, j])
    s.rollback(slots, drafts)
    return torch.stack(out, 1)


def _state(s: Sampler) -> list[torch.Tensor]:
    st = s.state
    return [t.clone() for t in (st.iparams, st.counts, st.hist) if t is not None]


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 4))])
def test_window_probs_match_sequential_accept_oracle(backend, seed):
    R = 5
    params, prompts, logits, drafts = _requests(seed, R)
    slots = [6, 1, 4, 0, 3]  # not in slot order
    s = _sampler(backend, params, prompts, slots)
    oracle = _sampler(backend, params, prompts, slots)
    dev = s.device
    x, d = logits.to(dev), drafts.to(dev)
    before = _state(s)
    got = s.window_probs(x, slots, d)
    assert got.shape == (R, 4, V) and got.dtype == torch.float32
    for a, b in zip(before, _state(s), strict=True):
        assert torch.equal(a, b)  # commits nothing
    want = _sequential(oracle, x, slots, d, oracle.probs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if backend[0] == "triton":  # and the two backends agree
        tref = _sampler(BACKENDS[0], params, prompts, slots)
        torch.testing.assert_close(got.cpu(), tref.window_probs(logits, slots, drafts),
                                   atol=2e-6, rtol=1e-5)


def test_window_oracle_is_exercised():
    """The random windows above do change the distributions through each mechanism: drafts
    complete bad-word prefixes, lift the min_new_tokens suppression and move penalties."""
    seen = set()
    for seed in range(4):
        params, prompts, logits, drafts = _requests(seed, 5)
        slots = [6, 1, 4, 0, 3]
        s = _sampler(BACKENDS[0], params, prompts, slots)
        win = s.window_probs(logits, slots, drafts)
        plain = torch.stack([s.probs(logits[:, j].contiguous(), slots) for j in range(4)], 1)
        for r, p in enumerate(params):
            moved = bool((win[r, 1:] != plain[r, 1:]).any())
            if moved and p.bad_words_token_ids and not p.uses_penalties and not p.min_new_tokens:
                seen.add("bad_words")
            if moved and p.min_new_tokens and not p.uses_penalties and not p.bad_words_token_ids:
                seen.add("min_new_tokens")
            if moved and p.uses_penalties and not p.bad_words_token_ids and not p.min_new_tokens:
                seen.add("penalties")
            if p.is_greedy and moved:
                seen.add("greedy")
    assert seen == {"bad_words", "min_new_tokens", "penalties", "greedy"}, seen


@pytest.mark.parametrize("seed", range(2))
def test_window_logprobs_match_sequential_processed_logprobs(backend, seed):
    R = 4
    params, prompts, logits, drafts = _requests(10 + seed, R)
    slots = [2, 5, 0, 7]
    s = _sampler(backend, params, prompts, slots)
    oracle = _sampler(backend, params, prompts, slots)
    x, d = logits.to(s.device), drafts.to(s.device)
    got = s.window_logprobs(x, slots, d)
    want = _sequential(oracle, x, slots, d, oracle.processed_logprobs)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=1e-5, rtol=0)


def test_window_probs_is_one_process_and_one_select_launch(monkeypatch):
    """The Triton path of a k-window: 2 launches (the sequential loop took 2(k+1) + k)."""
    params, prompts, logits, drafts = _requests(3, 5)
    slots = [6, 1, 4, 0, 3]
    s = _sampler(BACKENDS[1], params, prompts, slots)
    calls = {"process": 0, "select": 0, "accept": 0}
    for mod, fn, name in ((KP, "process_logits", "process"), (KS, "select", "select"),
                          (KA, "accept", "accept")):
        real = getattr(mod, fn)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(mod, fn, counted)
    x, d = logits.to(s.device), drafts.to(s.device)
    s.window_probs(x, slots, d)
    assert calls == {"process": 1, "select": 1, "accept": 0}
    _sequential(s, x, slots, d, s.probs)
    k = drafts.shape[1]
    assert calls == {"process": 1 + (k + 1), "select": 1 + (k + 1), "accept": k}


def test_window_of_one_position_is_probs(backend):
    params, prompts, logits, _ = _requests(7, 3)
    slots = [0, 1, 2]
    s = _sampler(backend, params, prompts, slots)
    x = logits[:, :1].to(s.device)
    got = s.window_probs(x, slots, torch.empty(3, 0, dtype=torch.long, device=s.device))
    torch.testing.assert_close(got[:, 0], s.probs(x[:, 0].contiguous(), slots), atol=0, rtol=0)


def test_verify_is_keyed_by_slot_seed_and_step_counter(backend):
    R, K = 5, 3
    params, prompts, logits, drafts = _requests(5, R)
    slots = [3, 0, 6, 2, 5]
    s = _sampler(backend, params, prompts, slots)
    s.accept(slots, torch.tensor([[1, 2], [3, -1], [-1, -1], [4, 4], [20, 1]]))
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(R, K, V, generator=g), -1)
    nd = [3, 2, 0, 3, 1]
    dev = s.device
    p = s.window_probs(logits.to(dev), slots, drafts.to(dev))
    out, n_acc = s.verify(p, q.to(dev), drafts.clamp(min=0).to(dev), nd, slots)
    seeds = torch.tensor([s.params(x).seed for x in slots])
    want = verify_reference(p.cpu(), q, drafts.clamp(min=0), torch.tensor(nd), seeds,
                            s.step_counters(slots).long().cpu())
    assert out.cpu().tolist() == want[0].tolist() and n_acc.cpu().tolist() == want[1].tolist()
    assert s.step_counters(slots).tolist() == [2, 1, 0, 2, 2]  # verify commits nothing
    with pytest.raises(ValueError, match="n_draft"):
        s.verify(p, q.to(dev), drafts.clamp(min=0).to(dev), [4, 0, 0, 0, 0], slots)


def test_draw_is_keyed_by_salted_seed_and_step_counter(backend):
    """Bit-identical to the drafters' former ``draw(q, seed ^ salt, position)``."""
    R, salt = 6, 0x2545F4914F6CDD1D
    slots = [5, 2, 7, 0, 1, 3]
    s = _sampler(backend, [SamplingParams(seed=11 * r + 1) for r in range(R)], [[]] * R, slots)
    q = torch.softmax(torch.randn(R, V, generator=torch.Generator().manual_seed(2)) * 0.5, -1)
    seeds = torch.tensor([11 * r + 1 for r in range(R)])
    got = [s.draw(q.to(s.device), slots, salt=salt).cpu()]
    s.accept(slots, got[0])
    got.append(s.draw(q.to(s.device), slots, salt=salt).cpu())
    for pos, tok in enumerate(got):
        assert torch.equal(tok, ref.draw(q, seeds ^ salt, torch.full((R,), pos)))
    assert not torch.equal(got[0], got[1])  # the step counter moved the stream
    assert not torch.equal(got[0], ref.draw(q, seeds, torch.zeros(R)))  # and the salt matters
    with pytest.raises(ValueError, match="salt"):
        s.draw(q.to(s.device), slots, salt=2**64)


@pytest.mark.parametrize("wrong", [None, "tempered"])
def test_draw_follows_probs(wrong):
    """20k draws (500 slots x 40 step counters) fit q; the negative control (the same
    draws against a sharpened q) is rejected."""
    n_slots, steps, Vs = 500, 40, 24
    q = torch.softmax(torch.randn(Vs, generator=torch.Generator().manual_seed(3)) * 1.2, -1)
    s = Sampler(Vs, n_slots, "cpu", seed=5)
    for slot in range(n_slots):
        s.add(slot, SamplingParams())
    slots = list(range(n_slots))
    toks = []
    for _ in range(steps):
        toks.append(s.draw(q.expand(n_slots, Vs), slots, salt=12345))
        s.advance(slots, 1)
    counts = np.bincount(torch.cat(toks).numpy(), minlength=Vs)
    expected = q if wrong is None else torch.softmax(torch.log(q) * 1.15, -1)
    res = goodness_of_fit(counts, expected.double().numpy())
    if wrong is None:
        assert res.impossible == 0 and res.pvalue > P_ACCEPT, res
    else:
        assert res.pvalue < P_REJECT, res


def test_window_api_errors():
    s = Sampler(V, 4, "cpu")
    s.add(0, SamplingParams())
    s.add(1, SamplingParams())
    x = torch.zeros(2, 3, V)
    d = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="repeat"):
        s.window_probs(x, [1, 1], d)
    with pytest.raises(ValueError, match="drafts"):
        s.window_probs(x, [0, 1], d[:, :1])
    with pytest.raises(ValueError, match="drafts"):
        s.window_probs(x, [0, 1], d.float())
    with pytest.raises(ValueError, match=r"logits must be \[R, W"):
        s.window_probs(x[:, 0], [0, 1], d)
    with pytest.raises(ValueError, match="at most"):
        s.window_probs(torch.zeros(2, 70, V), [0, 1], torch.zeros(2, 69, dtype=torch.long))
    with pytest.raises(KeyError):
        s.window_logprobs(x, [0, 2], d)
    with pytest.raises(ValueError, match="n"):
        s.advance([0], -1)
