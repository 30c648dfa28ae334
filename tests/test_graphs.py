"""CUDA-graph paths simulated on CPU: speculative verification windows per (bucket, width),
a draft model's decode steps, steered windows, capture failures, and the one upload per
step. The captured forwards are replayed eagerly on the same static buffers
(:func:`~decodekit.engine.graphs.eager_capture`), so the bucketing, padding and buffer
logic of the CUDA path runs here; the oracle is the eager generator (and HF greedy)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _models import hf_greedy, tiny_model, word_tokenizer
from test_speculative import near_copy

from decodekit import (
    DraftModel,
    LayerSkipDraft,
    NGramDraft,
    SamplingParams,
    Steering,
    SteeringVector,
    TokenGenerator,
)
from decodekit.engine.graphs import eager_capture
from decodekit.engine.runner import window_widths

pytestmark = pytest.mark.usefixtures("one_thread")


def counting(counts: Counter, label: str):
    """An eager capture that counts replays per (label, width)."""

    def capture(fn, device):
        replay, out = eager_capture(fn, device)
        key = (label, out.shape[1])

        def run():
            counts[key] += 1
            replay()
        return run, out
    return capture


def _run(gen, prompts, params, steering=None, num_steps=2):
    """Generate to the end, one batch (or one row at a time when ``single``); returns
    (tokens, chosen logprobs) per request."""
    steering = steering or [None] * len(prompts)
    ctxs = [gen.new_context(p, q, steering=s) for p, q, s in zip(prompts, params, steering, strict=True)]
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)
    for c in ctxs:
        gen.release(c)
    return [(c.generated_token_ids, [lp.token_log_probabilities[0] for lp in c.logprobs]) for c in ctxs]


def _same(graphed, eager):
    """Equal tokens; logprobs equal up to float summation order (a graph attends over the
    whole cache, an eager forward over a shorter span)."""
    assert [t for t, _ in graphed] == [t for t, _ in eager]
    for (_, lp_g), (_, lp_e) in zip(graphed, eager, strict=True):
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), atol=1e-5, rtol=0)


PROMPTS = [[1, 5, 6, 7, 5, 6, 7, 5], [1, 40, 41, 40, 41], [1, 70, 71, 72, 73, 70, 71]]


def _params():
    return [SamplingParams(temperature=0, max_new_tokens=14, ignore_eos=True, logprobs=0),
            SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=3, max_new_tokens=14,
                           ignore_eos=True, logprobs=0),
            SamplingParams(temperature=0.7, min_p=0.1, frequency_penalty=0.4, seed=4, max_new_tokens=14,
                           ignore_eos=True, logprobs=0)]


def _gen(model, kind: str, k: int = 3):
    draft = {"ngram": lambda: NGramDraft(n=1, k=k), "model": lambda: DraftModel(near_copy(model, 0.3), k=k),
             "skip": lambda: LayerSkipDraft(1, k=k)}[kind]()
    return TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, cuda_graphs=False,
                          draft=draft, adaptive_k=False)


@pytest.mark.parametrize("kind", ["ngram", "model", "skip"])
def test_speculative_windows_replay_graphs(kind):
    """Verification windows replay the graph of the smallest captured width >= K + 1 (padded
    columns included) and a draft model's (or the layer-skip drafter's) steps replay their
    own decode graphs; tokens and
    logprobs equal the eager generator's, batched and one row at a time (K = 1 and K up to 3)."""
    model = tiny_model("llama")
    eager = _gen(model, kind)
    counts: Counter = Counter()
    gen = _gen(model, kind)
    gen.runner.enable_graphs(counting(counts, "target"), window=gen.spec_k)
    gen.speculative.enable_graphs(counting(counts, "draft"))
    assert sorted(gen.runner.window_graphs) == window_widths(3) == [2, 4]
    assert all(not g.failed for g in gen.runner.window_graphs.values())
    assert sorted(gen.runner.steered_window_graphs) == [2, 4]
    runs = [(PROMPTS, _params())] + [([p], [q]) for p, q in zip(PROMPTS, _params(), strict=True)]
    for prompts, params in runs:
        _same(_run(gen, prompts, params), _run(eager, prompts, params))
    assert counts["target", 4] > 0, counts  # windows replayed
    if kind == "model":  # a batch of 3 drafts one token per row on a CPU (the batch cap): width 2
        assert counts["target", 2] > 0, counts
    assert gen.speculative.stats.steps > 0 and gen.spec_stats.accepted > 0
    if kind != "ngram":
        assert counts["draft", 1] > 0  # the drafting steps replayed their decode graphs
    assert _run(gen, [PROMPTS[0]], [_params()[0]])[0][0] == hf_greedy(model, PROMPTS[0], 14)


def test_steered_speculative_windows_replay_the_steered_set():
    """With a steered request in the batch, windows replay the steered window set; the tokens
    equal the eager generator's (control: the steering changes them)."""
    model = tiny_model("llama")
    H = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    steer = Steering(SteeringVector({i: 3.0 * torch.randn(H, generator=g) / H**0.5 for i in (0, 1)}), 1.0)
    steering = [steer, None, None]
    params = [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0)] * 3
    eager = _run(_gen(model, "ngram"), PROMPTS, params, steering)
    counts: Counter = Counter()
    gen = _gen(model, "ngram")
    gen.runner.enable_graphs(counting(counts, "target"), window=gen.spec_k)
    graphed = _run(gen, PROMPTS, params, steering)
    _same(graphed, eager)
    assert counts["target", 2] > 0
    plain = _run(gen, PROMPTS, params)
    assert plain[0][0] != graphed[0][0] and plain[1][0] == graphed[1][0]


def test_window_capture_failure_falls_back_for_that_bucket():
    """A window bucket whose capture raises says which set and bucket fell back and why; its
    windows then run eagerly with the right tokens."""
    model = tiny_model("llama")
    gen = _gen(model, "ngram")
    calls = Counter()

    def flaky(fn, device):
        replay, out = eager_capture(fn, device)
        calls[out.shape[1]] += 1
        if out.shape[1] == 4 and calls[4] == 1:  # width 4, batch 1 of the plain set
            raise RuntimeError("capture exploded")
        return replay, out

    msg = r"window 4 batch 1, running eagerly \(RuntimeError: capture exploded\)"
    with pytest.warns(UserWarning, match=msg):
        gen.runner.enable_graphs(flaky, window=gen.spec_k)
    assert gen.runner.window_graphs[4].failed == {1} and not gen.runner.window_graphs[2].failed
    p = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    assert _run(gen, [PROMPTS[0]], [p])[0][0] == hf_greedy(model, PROMPTS[0], 12)


def test_enable_graphs_needs_free_slots():
    gen = _gen(tiny_model("llama"), "ngram")
    ctx = gen.new_context([1, 2, 3], SamplingParams(max_new_tokens=4))
    gen.next_token({ctx.request_id: ctx})
    with pytest.raises(RuntimeError, match="every slot free"):
        gen.enable_graphs(eager_capture)


def test_decode_step_makes_one_upload(monkeypatch):
    """A plain decode step uploads its integers once (slots, int32 slots, positions,
    lengths), and the sampler uses that upload instead of its own (it uploads once per call,
    for the call's checkpoint). Control: counting works (the prefill uploads through the
    sampler)."""
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    sampler_uploads = Counter()
    real = gen.sampler.state.upload

    def count(values):
        sampler_uploads["n"] += 1
        return real(values)

    monkeypatch.setattr(gen.sampler.state, "upload", count)
    params = [SamplingParams(temperature=0.8, top_k=5, seed=i, max_new_tokens=20) for i in range(3)]
    ctxs = [gen.new_context([1, 5 + i, 6], p) for i, p in enumerate(params)]
    batch = {c.request_id: c for c in ctxs}
    gen.next_token(batch)  # prefill
    assert sampler_uploads["n"] > 0
    per_call = []
    for steps in (1, 5):
        before, sampler_uploads["n"] = gen.runner.uploads.uploads, 0
        gen.next_token(batch, num_steps=steps)
        assert gen.runner.uploads.uploads - before == steps
        per_call.append(sampler_uploads["n"])
    assert per_call[0] == per_call[1] <= 1  # the call's checkpoint, none per step
