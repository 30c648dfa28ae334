"""Regression tests for the adversarial run's findings (issue "Reliability"), one per item,
numbered as in the issue. The fuzz suite is tests/test_fuzz.py."""

from __future__ import annotations

import time
import tracemalloc

import pytest
import torch
from _models import word_tokenizer

from decodekit import Sampler, SamplingParams
from decodekit.engine.eos import EOSTracker
from decodekit.params import LIMITS, MIN_TEMPERATURE

BACKENDS = ["torch", "triton"]  # triton: the kernels (in the interpreter on a CPU)


def _commit_all(tr: EOSTracker, ids: list[int]) -> None:
    for t in ids:
        if tr.commit([t]).finished:
            return


# 1 ---------------------------------------------------------------------------------------------
def test_01_backtracking_stop_pattern_runs_in_linear_time():
    """``(\\S+\\s*)+!`` never matches a text without "!": Python's re would take time doubling
    with every word; RE2 takes microseconds. 600 words through the tracker, one token each."""
    tok = word_tokenizer()
    tr = EOSTracker(SamplingParams(stop_pattern=r"(\S+\s*)+!", max_new_tokens=600), eos_token_ids=[2],
                    tokenizer=tok)
    t0 = time.perf_counter()
    _commit_all(tr, [5 + i % 200 for i in range(600)])
    assert tr.finish_reason == "length"
    assert time.perf_counter() - t0 < 10  # a hang detector: re needs longer than the universe
    # the pattern still works where it matches
    tr = EOSTracker(SamplingParams(stop_pattern=r"w7 w8", max_new_tokens=50), eos_token_ids=[2],
                    tokenizer=tok)
    _commit_all(tr, [5, 6, 7, 8, 9])
    assert tr.finish_reason == "stop" and tr.stop_reason == "w7 w8" and tr.token_ids == (5, 6, 7, 8)


# 2 ---------------------------------------------------------------------------------------------
def test_02_stop_strings_cost_linear_memory_and_have_limits():
    n, length = LIMITS["stop strings"], LIMITS["stop string characters"]
    tracemalloc.start()
    tr = EOSTracker(SamplingParams(stop=[f"{i:04d}" + "x" * (length - 4) for i in range(n)]),
                    eos_token_ids=[2], tokenizer=word_tokenizer())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, peak  # every prefix stored: 64 x 1024^2 / 2 characters = 32 MiB+
    _commit_all(tr, [5, 6, 7])
    with pytest.raises(ValueError, match=rf"stop strings must be at most {length} characters"):
        SamplingParams(stop=["x" * (length + 1)])
    with pytest.raises(ValueError, match=rf"stop must have at most {n} strings"):
        SamplingParams(stop=[str(i) for i in range(n + 1)])


# 6 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"logit_bias": {3: 1e39}}, r"logit_bias\[3\].*float32"),
    ({"logit_bias": {3: -1e300}}, r"logit_bias\[3\].*float32"),
    ({"min_new_tokens": 2**31}, "min_new_tokens"),
    ({"max_new_tokens": 2**31}, "max_new_tokens"),
    ({"top_k": 2**31}, "top_k"),
])
def test_06_values_beyond_the_device_tables_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_06_values_at_the_limits_sample(backend):
    s = Sampler(50, 2, "cpu", backend=backend)
    s.add(0, SamplingParams(logit_bias={3: 3.4e38, 4: -3.4e38}, seed=1), [1, 2])
    s.add(1, SamplingParams(min_new_tokens=2**31 - 1, max_new_tokens=2**31 - 1, top_k=2**31 - 1, seed=2))
    out = s.sample(torch.randn(2, 50), [0, 1]).token_ids.tolist()
    assert out[0] == 3 and 0 <= out[1] < 50


# 7 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"temperature": 10**400}, {"top_p": 10**400},
                                    {"logit_bias": {1: 10**400}}, {"repetition_penalty": -10**400}])
def test_07_huge_ints_are_value_errors(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


# 8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1e-39, 1e-45, 5e-324, MIN_TEMPERATURE / 2])
def test_08_tiny_temperatures_are_refused(t):
    with pytest.raises(ValueError, match=r"temperature.*0 \(greedy\)"):
        SamplingParams(temperature=t)


@pytest.mark.parametrize("backend", BACKENDS)
def test_08_smallest_temperature_keeps_top_k_exact(backend):
    """At the smallest temperature the top-2 set is still exactly 2 tokens and the draws are
    near-greedy (the overflow made 4 tied tokens survive and sampled uniformly)."""
    s = Sampler(64, 1, "cpu", backend=backend)
    s.add(0, SamplingParams(temperature=MIN_TEMPERATURE, top_k=2, seed=0))
    logits = torch.linspace(-1, 30, 64)[None].clone()
    logits[0, 10] = 30.0  # ties with the maximum at index 63
    probs = s.probs(logits, [0])
    assert int((probs > 0).sum()) == 2 and set(torch.nonzero(probs[0]).flatten().tolist()) == {10, 63}
    draws = {int(s.sample(logits, [0]).token_ids) for _ in range(8)}
    assert draws <= {10, 63}


# 17 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [r"\b", r"(?<=w)", r"^", r"$", r"x*", r"(?:)", r"\B"])
def test_17_zero_width_stop_patterns_are_refused(pattern):
    with pytest.raises(ValueError, match="stop_pattern"):
        SamplingParams(stop_pattern=pattern)
