"""Sampler behaviour: slots, batch invariance, state updates, masks, errors.

Each behavioural test runs on both backends (torch reference and the Triton path,
interpreted on CPU), so the two are held to the same contract.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNEL_DEVICE

import decodekit
from decodekit import Sampler, SamplingParams

BACKENDS = [("torch", "cpu"), ("triton", KERNEL_DEVICE)]


def make(backend, V=200, S=8, **kw) -> Sampler:
    name, dev = backend
    return Sampler(V, S, dev, backend=name, **kw)


def logits(B, V, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 2).to(device)


@pytest.fixture(params=BACKENDS, ids=lambda b: b[0])
def backend(request):
    return request.param


def test_seeded_request_is_batch_invariant(backend):
    """Same seed -> same tokens whatever the slot, batch size and batch-mates."""
    V, steps = 150, 5
    p = SamplingParams(seed=1234, top_p=0.9, temperature=0.8)
    alone = make(backend, V)
    alone.add(0, p)
    xs = [logits(1, V, seed=s, device=alone.device) for s in range(steps)]
    want = [alone.sample(x, [0]).token_ids.item() for x in xs]

    crowd = make(backend, V)
    for slot in (0, 1, 2, 3, 4, 6):
        crowd.add(slot, SamplingParams(seed=slot, top_k=5))
    crowd.add(5, p)
    got = []
    for s, x in enumerate(xs):
        mates = logits(4, V, seed=100 + s, device=crowd.device)
        batch = torch.cat([mates[:2], x, mates[2:]])  # our row sits at position 2
        got.append(crowd.sample(batch, [3, 0, 5, 6, 1]).token_ids[2].item())
    assert got == want


def test_unseeded_requests_differ_and_sampler_seed_reproduces(backend):
    V = 500
    x = logits(1, V).expand(4, V).contiguous().to(backend[1])
    runs = []
    for _ in range(2):
        s = make(backend, V, seed=99)
        for slot in range(4):
            s.add(slot, SamplingParams(temperature=5.0))
        runs.append(s.sample(x, [0, 1, 2, 3]).token_ids.tolist())
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1  # four unseeded requests got different streams


def test_slot_reuse_forgets_previous_request(backend):
    V = 120
    s = make(backend, V)
    s.add(0, SamplingParams(repetition_penalty=2.0, presence_penalty=2.0, seed=1), [5, 6])
    for i in range(3):
        s.sample(logits(1, V, i, s.device), [0])
    s.remove(0)
    s.add(0, SamplingParams(temperature=0.0))
    fresh = make(backend, V)
    fresh.add(0, SamplingParams(temperature=0.0))
    x = logits(1, V, 9, s.device)
    torch.testing.assert_close(s.probs(x, [0]), fresh.probs(x, [0]))
    assert s.sample(x, [0]).token_ids.item() == x.argmax().item()


def test_penalty_counts_are_incremental_on_device(backend):
    V = 50
    s = make(backend, V)
    s.add(1, SamplingParams(frequency_penalty=0.5, seed=3), [7, 7, 8])
    x = torch.zeros(1, V, device=s.device)
    x[0, 20] = 10.0  # token 20 wins until its frequency penalty bites
    toks = [s.sample(x, [1]).token_ids.item() for _ in range(4)]
    counts = s.state.counts[1].cpu()
    assert counts[7].item() == 1 and counts[8].item() == 1  # prompt flag only
    for t in set(toks):
        assert counts[t].item() == 2 * toks.count(t) + (t in (7, 8))
    assert s.step_counters([1]).item() == 4  # step counter


def test_accept_commits_external_tokens(backend):
    V = 40
    s = make(backend, V)
    s.add(0, SamplingParams(presence_penalty=2.0, temperature=0.0))
    s.add(1, SamplingParams(presence_penalty=2.0, temperature=0.0))
    x = torch.full((2, V), -5.0, device=s.device)
    x[:, 3] = 1.5
    x[:, 4] = 1.0
    assert s.sample(x, [0, 1]).token_ids.tolist() == [3, 3]
    s.accept([0, 1], torch.tensor([[4, -1], [-1, -1]], device=s.device))
    # row 0: both 3 and 4 penalised by 2 -> 3 (-0.5) still beats 4 (-1.0); row 1 only 3.
    x[:, 5] = -0.7
    assert s.sample(x, [0, 1]).token_ids.tolist() == [3, 4]
    assert s.step_counters([0, 1]).tolist() == [3, 2]


def test_min_new_tokens_suppresses_eos_and_stop_ids(backend):
    V = 30
    s = make(backend, V, eos_token_ids=[2])
    s.add(0, SamplingParams(temperature=0.0, min_new_tokens=2, stop_token_ids=[3]))
    x = torch.zeros(1, V, device=s.device)
    x[0, 2], x[0, 3], x[0, 4] = 9.0, 8.0, 1.0
    assert [s.sample(x, [0]).token_ids.item() for _ in range(3)] == [4, 4, 2]


def test_multi_token_bad_words_ban_only_after_prefix(backend):
    V = 30
    s = make(backend, V)
    s.add(0, SamplingParams(temperature=0.0, bad_words_token_ids=[[5, 7], [6, 7, 7], [9]]), [1, 5])
    x = torch.zeros(1, V, device=s.device)
    x[0, 9], x[0, 7], x[0, 6], x[0, 8] = 10.0, 6.0, 5.0, 3.0  # 9 is always banned
    # [1, 5] bans 7 -> 6; [5, 6] bans nothing -> 7; [6, 7] bans 7 -> 6; [7, 6] -> 7
    assert [s.sample(x, [0]).token_ids.item() for _ in range(4)] == [6, 7, 6, 7]


def test_bad_word_history_survives_table_growth(backend):
    """A later request with longer bad words regrows the tables; earlier rows keep working."""
    V = 30
    s = make(backend, V)
    s.add(0, SamplingParams(temperature=0.0, bad_words_token_ids=[[4, 5]]), [1, 2, 3])
    x = torch.zeros(2, V, device=s.device)
    x[:, 5], x[:, 4], x[:, 6] = 9.0, 8.0, 7.0
    assert s.sample(x[:1], [0]).token_ids.item() == 5  # history ends in 3: 5 allowed
    x[:, 5] = 7.5
    x[:, 4] = 10.0
    assert s.sample(x[:1], [0]).token_ids.item() == 4
    s.add(1, SamplingParams(temperature=0.0, bad_words_token_ids=[[7, 8, 9, 10, 4, 5]]))
    assert s.state.hist.shape[1] >= 8
    # slot 0 history ends in 4 -> 5 banned: 4 again (10.0) ... then 4 -> 5 banned again
    assert s.sample(x, [0, 1]).token_ids.tolist() == [4, 4]
    x[:, 4] = -1.0
    assert s.sample(x, [0, 1]).token_ids.tolist() == [6, 5]


def test_logit_bias_and_allowed_tokens(backend):
    V = 60
    s = make(backend, V)
    s.add(0, SamplingParams(allowed_token_ids=[10, 11, 12], logit_bias={11: 5.0}, seed=0))
    s.add(1, SamplingParams(logit_bias={40: 100.0}, seed=0))
    x = logits(2, V, 4, s.device)
    p = s.probs(x, [0, 1]).cpu()
    assert set(torch.nonzero(p[0]).flatten().tolist()) == {10, 11, 12}
    assert p[1, 40] > 0.999
    for _ in range(5):
        t = s.sample(x, [0, 1]).token_ids.tolist()
        assert t[0] in (10, 11, 12) and t[1] == 40


def test_slots_on_device_tensor(backend):
    V = 80
    s = make(backend, V)
    s.add(2, SamplingParams(seed=5, top_k=3))
    s.add(4, SamplingParams(temperature=0.0))
    x = logits(2, V, 1, s.device)
    idx = torch.tensor([4, 2], device=s.device)
    t = s.sample(x, idx).token_ids
    assert t.device.type == s.device.type and t.dtype == torch.int64
    assert t[0].item() == x[0].argmax().item()


def test_logprobs_raw_mode(backend):
    V = 90
    s = make(backend, V)
    s.add(0, SamplingParams(logprobs=5, top_k=4, seed=0))
    s.add(1, SamplingParams(seed=1))
    x = logits(2, V, 2, s.device)
    out = s.sample(x, [0, 1])
    lsm = torch.log_softmax(x.float().cpu(), -1)
    torch.testing.assert_close(out.logprobs.cpu(), lsm.gather(1, out.token_ids.cpu()[:, None])[:, 0])
    torch.testing.assert_close(out.top_logprobs.cpu(), lsm.topk(5, -1).values)
    lp = out.log_probabilities(0)
    assert len(lp.top_log_probabilities[0]) >= 5
    assert math.isclose(lp.token_log_probabilities[0], out.logprobs[0].item())


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "params, match",
    [
        (SamplingParams(logit_bias={500: 1.0}), "logit_bias"),
        (SamplingParams(allowed_token_ids=[3, 999]), "allowed_token_ids"),
        (SamplingParams(bad_words_token_ids=[[1, 1000]]), "bad_words_token_ids"),
        (SamplingParams(stop_token_ids=[200]), "stop_token_ids"),
        (SamplingParams(allowed_token_ids=[3], bad_words_token_ids=[[3]]), "allowed_token_ids"),
        (SamplingParams(allowed_token_ids=[2], min_new_tokens=1), "allowed_token_ids"),
    ],
)
def test_add_rejects_requests_that_do_not_fit_the_vocabulary(params, match):
    s = Sampler(200, 2, "cpu", eos_token_ids=[2])
    with pytest.raises(ValueError, match=match):
        s.add(0, params)
    s.add(0, SamplingParams())  # the failed add left the slot free


def test_api_errors():
    s = Sampler(100, 2, "cpu")
    with pytest.raises(ValueError, match="slot"):
        s.add(2, SamplingParams())
    with pytest.raises(ValueError, match="prompt_token_ids"):
        s.add(0, SamplingParams(), [100])
    s.add(0, SamplingParams())
    with pytest.raises(ValueError, match="in use"):
        s.add(0, SamplingParams())
    with pytest.raises(ValueError, match=r"logits must be \[B, 100\]"):
        s.sample(torch.zeros(1, 99), [0])
    with pytest.raises(ValueError, match="dtype"):
        s.sample(torch.zeros(1, 100, dtype=torch.float64), [0])
    with pytest.raises(KeyError, match="1"):
        s.sample(torch.zeros(1, 100), [1])
    s.add(1, SamplingParams())
    with pytest.raises(ValueError, match="repeat"):
        s.sample(torch.zeros(2, 100), [1, 1])
    with pytest.raises(ValueError, match="rows"):
        s.sample(torch.zeros(3, 100), [0, 1])
    s.remove(1)
    with pytest.raises(KeyError):
        s.remove(1)
    for kw, match in [(dict(vocab_size=0), "vocab_size"), (dict(max_batch_size=0), "max_batch_size"),
                      (dict(logprobs_mode="x"), "logprobs_mode"), (dict(backend="cuda"), "backend")]:
        args = dict(vocab_size=10, max_batch_size=1) | kw
        with pytest.raises(ValueError, match=match):
            Sampler(args.pop("vocab_size"), args.pop("max_batch_size"), "cpu", **args)


# ------------------------------------------------------------------ functional
def test_functional_sample_matches_sampler_and_uses_outputs():
    V = 70
    x = logits(2, V, 3)
    ps = [SamplingParams(seed=11, frequency_penalty=1.0), SamplingParams(temperature=0.0,
                                                                         presence_penalty=2.0)]
    outs = [[x[0].argmax().item()] * 3, [x[1].argmax().item()]]
    t = decodekit.sample(x, ps, prompt_token_ids=[[1], [2]], output_token_ids=outs)
    s = Sampler(V, 2, "cpu")
    for b in range(2):
        s.add(b, ps[b], [[1], [2]][b])
    s.accept([0, 1], torch.tensor([outs[0], outs[1] + [-1, -1]]))
    assert t.tolist() == s.sample(x, [0, 1]).token_ids.tolist()
    assert t[1].item() != x[1].argmax().item()  # presence penalty moved the greedy choice
    p = decodekit.processed_probs(x, ps[0])
    assert p.shape == (2, V)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="params"):
        decodekit.sample(x, [ps[0]])


def test_greedy_fast_path_only_when_every_row_is_greedy(backend):
    """A batch mixing greedy and plain sampled rows must still sample the sampled rows."""
    V = 400
    s = make(backend, V)
    s.add(0, SamplingParams(temperature=0.0))
    s.add(1, SamplingParams(temperature=50.0, seed=3))  # nearly uniform: argmax is unlikely
    x = logits(2, V, 5, s.device)
    x[:, 7] = float("nan")
    drawn = {s.sample(x, [0, 1]).token_ids[1].item() for _ in range(8)}
    assert len(drawn) > 1  # the sampled row is not stuck on the argmax
    alone = make(backend, V)
    alone.add(0, SamplingParams(temperature=0.0))
    for _ in range(3):
        assert alone.sample(x[:1], [0]).token_ids.item() == torch.nan_to_num(x[0], nan=-1e30).argmax()
    assert alone.step_counters([0]).item() == 3  # the step counter still advances


def test_rollback_undoes_accept(backend):
    V = 60
    s = make(backend, V)
    s.add(0, SamplingParams(frequency_penalty=0.5, repetition_penalty=1.2, seed=1,
                            bad_words_token_ids=[[3, 4]]), [1, 2, 3])
    s.add(1, SamplingParams(seed=2))
    before = (s.state.iparams.clone(), s.state.counts.clone(), s.state.hist.clone())
    x = logits(2, V, 1, s.device)
    p_before = s.probs(x, [0, 1])
    toks = torch.tensor([[5, 5, 9], [7, -1, -1]], device=s.device)
    s.accept([0, 1], toks)
    assert not torch.equal(s.probs(x, [0, 1]), p_before)
    s.rollback([0, 1], toks)
    assert torch.equal(s.state.iparams, before[0]) and torch.equal(s.state.counts, before[1])
    torch.testing.assert_close(s.probs(x, [0, 1]), p_before)


def test_multi_token_bad_words_that_could_ban_every_allowed_token_are_refused():
    s = Sampler(64, 2, "cpu")
    with pytest.raises(ValueError, match="allowed_token_ids"):
        s.add(0, SamplingParams(allowed_token_ids=[5, 6], bad_words_token_ids=[[5, 5], [5, 6]]), [5])
    s.add(0, SamplingParams(allowed_token_ids=[5, 6, 7], bad_words_token_ids=[[5, 5], [5, 6]]), [5])
