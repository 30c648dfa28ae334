"""Kernel parity: the Triton path (interpreter on CPU, real kernels on CUDA) against
the torch reference, feature by feature, over several steps, plus the sm_80/sm_90
ahead-of-time compile of every kernel configuration the sampler launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from _helpers import bitmask_words
from conftest import KERNEL_DEVICE
from decodekit.kernels import _common as KC
from decodekit.kernels.accept import accept as accept_kernel

from decodekit import Sampler, SamplingParams
from decodekit.sampling import reference as ref

ROOT = Path(__file__).resolve().parents[1]

FEATURES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "typical": dict(typical_p=0.7),
    "typical_masked": dict(typical_p=0.8, logit_bias={0: float("-inf")}, bad_words_token_ids=[[9]]),
    "penalties": dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=0.4),
    "bias": dict(logit_bias={3: 4.0, 10: -2.0, 11: float("-inf")}),
    "allowed": dict(allowed_token_ids=list(range(0, 200, 3))),
    "bad_words": dict(bad_words_token_ids=[[5], [6, 7], [1, 2, 9]]),
    "min_new": dict(min_new_tokens=3, stop_token_ids=[4, 8]),
    "logprobs": dict(logprobs=3),
    "all": dict(
        temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, typical_p=0.95,
        repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2,
        logit_bias={1: 2.0, 2: -1.0}, bad_words_token_ids=[[12], [13, 14]],
        min_new_tokens=2, stop_token_ids=[15], logprobs=2,
    ),
}


def _pair(V: int, max_batch: int, **kw) -> tuple[Sampler, Sampler]:
    kern = Sampler(V, max_batch, KERNEL_DEVICE, backend="triton", eos_token_ids=[0], **kw)
    tref = Sampler(V, max_batch, "cpu", backend="torch", eos_token_ids=[0], **kw)
    return kern, tref


def _logits(B: int, V: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 2.5
    x[:, :20] += 2.0  # make the penalised/biased head matter
    return x.to(dtype)


def _same_state(a: Sampler, b: Sampler) -> None:
    torch.testing.assert_close(a.state.iparams.cpu(), b.state.iparams.cpu(), rtol=0, atol=0)
    for name in ("counts", "hist"):
        ta, tb = getattr(a.state, name), getattr(b.state, name)
        assert (ta is None) == (tb is None)
        if ta is not None:
            torch.testing.assert_close(ta.cpu(), tb.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("feature", [  # top_k / top_p / typical alone: also inside "all" and "typical_masked"
    pytest.param(f, marks=pytest.mark.slow) if f in ("top_k", "top_p", "typical") else f for f in FEATURES])
def test_kernel_matches_reference_over_steps(feature):
    V, B, steps = 300, 3, 4
    kern, tref = _pair(V, 4)
    prompts = [[1, 2, 6, 7], [20, 21, 3], [5, 5, 1, 2]]
    for b in range(B):
        p = SamplingParams(seed=100 + b, **FEATURES[feature])
        kern.add(b, p, prompts[b])
        tref.add(b, p, prompts[b])
    slots = [2, 0, 1]  # batch order differs from slot order
    for step in range(steps):
        x = _logits(B, V, seed=step)
        pk = kern.probs(x.to(KERNEL_DEVICE), slots).cpu()
        pr = tref.probs(x, slots)
        torch.testing.assert_close(pk, pr, atol=2e-6, rtol=1e-5)
        ok = kern.sample(x.to(KERNEL_DEVICE), slots)
        orf = tref.sample(x, slots)
        assert ok.token_ids.cpu().tolist() == orf.token_ids.tolist()
        assert (pr.gather(1, orf.token_ids[:, None]) > 0).all()
        if orf.logprobs is not None:
            torch.testing.assert_close(ok.logprobs.cpu(), orf.logprobs, atol=1e-4, rtol=1e-5)
        if orf.top_logprobs is not None:
            torch.testing.assert_close(ok.top_logprobs.cpu(), orf.top_logprobs, atol=1e-4, rtol=1e-5)
            assert ok.top_token_ids.cpu().tolist() == orf.top_token_ids.tolist()
        _same_state(kern, tref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [1, 111, 1000, 2049])
def test_kernel_dtypes_and_odd_vocab(dtype, V):
    B = 5
    kern, tref = _pair(V, B)
    settings = [FEATURES["greedy"], FEATURES["temperature"], dict(top_k=3, top_p=0.9),
                dict(min_p=0.2, typical_p=0.8), dict(top_p=0.5, repetition_penalty=1.3)]
    for b, s in enumerate(settings):
        p = SamplingParams(seed=7 * b, **s)
        kern.add(b, p, [0])
        tref.add(b, p, [0])
    x = _logits(B, V, dtype, seed=V)
    slots = list(range(B))
    torch.testing.assert_close(kern.probs(x.to(KERNEL_DEVICE), slots).cpu(),
                               tref.probs(x, slots), atol=2e-6, rtol=1e-5)
    assert kern.sample(x.to(KERNEL_DEVICE), slots).token_ids.cpu().tolist() == \
        tref.sample(x, slots).token_ids.tolist()


def test_kernel_processed_logprobs_mode():
    V, B = 257, 2
    kern, tref = _pair(V, B, logprobs_mode="processed")
    for b in range(B):
        p = SamplingParams(seed=b, top_k=10, top_p=0.8, logprobs=4)
        kern.add(b, p)
        tref.add(b, p)
    x = _logits(B, V, seed=3)
    ok, orf = kern.sample(x.to(KERNEL_DEVICE), [0, 1]), tref.sample(x, [0, 1])
    assert ok.token_ids.cpu().tolist() == orf.token_ids.tolist()
    torch.testing.assert_close(ok.logprobs.cpu(), orf.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ok.top_logprobs.cpu(), orf.top_logprobs, atol=1e-5, rtol=1e-5)
    # processed logprobs of the alternatives sum to at most 1 and exclude filtered tokens
    assert (orf.top_logprobs.exp().sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("case", ["all_neg_inf", "nan_row", "some_nan", "pos_inf"])
def test_kernel_degenerate_rows_stay_in_vocabulary(case):
    V, B = 64, 3
    kern, tref = _pair(V, B)
    settings = [dict(temperature=0.0), dict(top_p=0.9), dict(allowed_token_ids=[5, 9, 40])]
    for b, s in enumerate(settings):
        p = SamplingParams(seed=b, **s)
        kern.add(b, p)
        tref.add(b, p)
    x = _logits(B, V, seed=1)
    if case == "all_neg_inf":
        x[:] = float("-inf")
    elif case == "nan_row":
        x[:] = float("nan")
    elif case == "some_nan":
        x[:, ::2] = float("nan")
    else:
        x[:, 7] = float("inf")
    for s in (kern, tref):
        tok = s.sample(x.to(s.device), [0, 1, 2]).token_ids.cpu()
        assert ((tok >= 0) & (tok < V)).all()
        assert tok[2].item() in (5, 9, 40)
        pr = s.probs(x.to(s.device), [0, 1, 2]).cpu()
        assert torch.isfinite(pr).all()
        assert (pr.gather(1, tok[:, None]) > 0).all(), (case, tok)
        if case == "some_nan":
            assert (tok % 2 == 1).all()  # NaN tokens are never drawn
        if case == "pos_inf":
            assert tok[:2].tolist() == [7, 7]


@triton.jit
def _noise_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    k1, k2 = KC.row_keys(tl.load(seed_ptr + r), tl.load(pos_ptr + r))
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + r * V + offs, KC.exponential(offs, k1, k2), mask=offs < V)


def test_rng_matches_reference_bit_for_bit():
    """The jit hash and Exp(1) variates equal decodekit.sampling.reference's."""
    seeds = torch.tensor([0, 1, 2**40 + 7, 2**63 - 1], dtype=torch.int64)
    pos = torch.tensor([0, 5, 123456, 2**31 - 1], dtype=torch.int64)
    V = 500
    out = torch.empty(4, V, device=KERNEL_DEVICE)
    _noise_kernel[(4,)](seeds.to(KERNEL_DEVICE), pos.to(KERNEL_DEVICE), out, V, BLOCK=512)
    expect = ref.exponential_noise(seeds, pos, V)
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=0)  # a few ulp of log()


@triton.jit
def _bits_kernel(r_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    r = tl.load(r_ptr + offs, mask=offs < N, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, KC.exponential_bits(r), mask=offs < N)


def test_exponential_bits_at_both_ends_match_reference():
    """Exp(1) from 32 bits (one logarithm shared by both branches) at the branch edge and
    both tails, where the smallest variate is ``E_MIN`` (the race's skip bound)."""
    edge = [0, 1, 2, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2**8, 2**32 - 3, 2**32 - 2, 2**32 - 1]
    rand = torch.randint(0, 2**32, (501,), generator=torch.Generator().manual_seed(0)).tolist()
    r = torch.tensor(edge + rand, dtype=torch.int64)
    out = torch.empty(r.shape[0], device=KERNEL_DEVICE)
    _bits_kernel[(1,)](r.to(KERNEL_DEVICE), out, r.shape[0], BLOCK=1024)
    expect = ref.exponential_from_bits(r)
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-6, atol=0)
    assert float(expect.min()) == KC.E_MIN == float(out[len(edge) - 1])
    v = ((2**32 - 1 - r).double() + 0.5) * 2.0**-32  # race_keys' bound: E >= min(v, 0.69)
    assert bool((expect.double() >= torch.clamp(v, max=0.69) * (1 - 1e-6)).all())


def test_race_draws_logarithms_on_few_tiles(monkeypatch):
    """The race skips the logarithm on tiles where no token can still win (an exact screen:
    the tokens equal the reference's). Counted by wrapping the Exp(1) helper in the
    interpreter: with 4 programs per row of 8 tiles each, each program draws its first
    tile and then only a few more. Control: without the screen every tile would draw."""
    if KERNEL_DEVICE != "cpu":
        pytest.skip("counts jit calls in the interpreter")
    calls = {"n": 0}
    real = KC.exponential_bits

    def counting(r):
        calls["n"] += 1
        return real(r)

    monkeypatch.setattr(KC, "exponential_bits", counting)
    V, B = 32000, 4
    g = torch.Generator().manual_seed(0)
    rows = {"zipf": (-1.1 * torch.log(torch.arange(1, V + 1).float()))[torch.randperm(V, generator=g)],
            "flat": 0.01 * torch.randn(V, generator=g), "peaked": 4 * torch.randn(V, generator=g)}
    tiles = -(-V // 1024) * B
    for name, row in rows.items():
        logits = row[None].repeat(B, 1)
        for params in (SamplingParams(temperature=0.8, seed=1),
                       SamplingParams(temperature=0.7, top_p=0.9, seed=2)):
            tri, torch_ = _pair(V, B)
            for s in range(B):
                tri.add(s, params)
                torch_.add(s, params)
            calls["n"] = 0
            got = tri.sample(logits.to(KERNEL_DEVICE), list(range(B))).token_ids
            assert 4 * B <= calls["n"] <= 0.6 * tiles, (name, params, calls["n"], tiles)
            assert got.tolist() == torch_.sample(logits, list(range(B))).token_ids.tolist()


@pytest.mark.parametrize("scope", [
    "--sample",  # the first and last configuration of every kernel (a cold compile of all: ~9 min)
    pytest.param("--all", marks=pytest.mark.slow)])
def test_aot_compile_kernel_configs_for_sm80_and_sm90(scope):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "aot_compile.py"), arch,
                          *([scope] if scope == "--sample" else [])],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for arch in ("80", "90")
    ]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]
        assert "compiled" in out and "kernel variants" in out


@pytest.mark.parametrize("case", ["neg_zero_threshold", "tiny_typical"])
def test_kernel_threshold_edge_cases(case):
    """-0.0 ties +0.0 at a threshold; typical_p so small that 1 - typical_p rounds to 1 still
    keeps the closest token (as transformers does)."""
    V = 64
    kern, tref = _pair(V, 1)
    if case == "neg_zero_threshold":
        x = torch.full((1, V), -5.0)
        x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 1.0, 0.0, -0.0, -0.0
        p = SamplingParams(top_k=2, seed=0)
    else:
        x = _logits(1, V, seed=2)
        p = SamplingParams(typical_p=1e-8, seed=0)
    kern.add(0, p)
    tref.add(0, p)
    pk, pr = kern.probs(x.to(KERNEL_DEVICE), [0]).cpu(), tref.probs(x, [0])
    torch.testing.assert_close(pk, pr, atol=2e-6, rtol=1e-5)
    assert (pr > 0).sum() == (4 if case == "neg_zero_threshold" else 1)


def test_kernel_accept_skips_out_of_range_device_ids():
    V = 32
    kern = Sampler(V, 2, KERNEL_DEVICE, backend="triton")
    for s in range(2):
        kern.add(s, SamplingParams(frequency_penalty=1.0))
    # what Sampler.accept does with device tensors (not read back): the kernel's guard
    tok = torch.tensor([[35, 3], [-1, 4]], dtype=torch.int32, device=KERNEL_DEVICE)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=KERNEL_DEVICE)
    accept_kernel(tok, slots, kern.state.iparams, kern.state.counts, None, V)
    counts = kern.state.counts.cpu()
    assert counts[1].nonzero().flatten().tolist() == [4]  # nothing leaked into slot 1
    assert counts[0].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError, match="outside"):
        kern.accept([0, 1], [[35], [1]])  # host ids are checked


@pytest.mark.parametrize("feature", ["greedy", "typical_masked", "all"])
def test_kernel_bitmask_matches_reference(feature):
    """Guided decoding's allowed-token bitmask inside the process pass: kernel == reference
    (probabilities, tokens, window rows), every token inside the mask, and a row whose own
    masks leave nothing inside the bitmask draws from the bitmask (the grammar wins)."""
    V, B = 300, 3
    kern, tref = _pair(V, 4)
    for b in range(B):
        p = SamplingParams(seed=50 + b, **FEATURES[feature])
        kern.add(b, p, [1, 2, 6])
        tref.add(b, p, [1, 2, 6])
    slots = [1, 0, 2]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        allowed = torch.rand(B, V, generator=g) < 0.3
        allowed[0] = False
        allowed[0, [0, 9, 12]] = True  # tokens the bias / bad words may ban: the grammar wins there
        mask = bitmask_words(allowed)
        x = _logits(B, V, seed=10 + step)
        pk = kern.probs(x.to(KERNEL_DEVICE), slots, mask=mask.to(KERNEL_DEVICE)).cpu()
        pr = tref.probs(x, slots, mask=mask)
        torch.testing.assert_close(pk, pr, atol=2e-6, rtol=1e-5)
        assert (pr[~allowed] == 0).all()
        tk = kern.sample(x.to(KERNEL_DEVICE), slots, mask=mask.to(KERNEL_DEVICE)).token_ids.cpu()
        tr = tref.sample(x, slots, mask=mask).token_ids
        assert tk.tolist() == tr.tolist() and allowed.gather(1, tr[:, None]).all()
    drafts = torch.tensor([[9, -1], [4, 5], [-1, -1]])
    wmask = bitmask_words(torch.rand(B * 3, V, generator=torch.Generator().manual_seed(5)) < 0.5)
    xw = _logits(B * 3, V, seed=99).view(B, 3, V)
    dev = KERNEL_DEVICE
    got = kern.window_probs(xw.to(dev), slots, drafts.to(dev), mask=wmask.to(dev)).cpu()
    torch.testing.assert_close(got, tref.window_probs(xw, slots, drafts, mask=wmask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_bitmask_with_half_logits(dtype):
    """The bitmask launch with fp16 / bf16 logits (the plain path's dtypes) == the reference."""
    V, B = 200, 2
    kern, tref = _pair(V, B)
    for b in range(B):
        p = SamplingParams(seed=b, temperature=0.9 if b else 0.0)
        kern.add(b, p)
        tref.add(b, p)
    allowed = torch.rand(B, V, generator=torch.Generator().manual_seed(1)) < 0.4
    mask = bitmask_words(allowed)
    x = _logits(B, V, dtype, seed=3)
    pk = kern.probs(x.to(KERNEL_DEVICE), [0, 1], mask=mask.to(KERNEL_DEVICE)).cpu()
    torch.testing.assert_close(pk, tref.probs(x, [0, 1], mask=mask), atol=2e-6, rtol=1e-5)
    assert (pk[~allowed] == 0).all()
