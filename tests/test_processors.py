"""Custom logits processors: transformers' own processors through the adapter give the same
greedy tokens as ``model.generate(logits_processor=...)`` (the oracle); per-request and batch
processors see the right rows and tokens; argmax-invariant ones are skipped for greedy rows;
bad arguments are ValueErrors naming the field."""

from __future__ import annotations

import pytest
import torch
from _models import tiny_model
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, SequenceBiasLogitsProcessor

from decodekit import BatchProcessorInputs, HFLogitsProcessor, NGramDraft, SamplingParams, TokenGenerator

PROMPTS = [[5, 9, 11, 5, 9], [17, 3, 40, 41, 42, 17, 3]]
N = 24


def _hf(model, prompt: list[int], processor) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, disable_compile=True,
                         max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0,
                         logits_processor=LogitsProcessorList([processor]) if processor else None)
    return out[0, len(prompt):].tolist()


def _dk(model, processors, num_steps: int = 1, **kw) -> list[list[int]]:
    gen = TokenGenerator(model, None, max_batch_size=2, max_seq_len=64, seed=0, **kw)
    params = SamplingParams(temperature=0.0, max_new_tokens=N, ignore_eos=True)
    ctxs = [gen.new_context(p, params, logits_processors=processors) for p in PROMPTS]
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)
    return [c.generated_token_ids for c in ctxs]


@pytest.mark.parametrize("num_steps", [1, 5])
def test_hf_processors_through_the_adapter_match_generate(num_steps):
    model = tiny_model("llama")
    procs = {"no_repeat": NoRepeatNGramLogitsProcessor(3),
             "sequence_bias": SequenceBiasLogitsProcessor({(5, 9): -20.0, (11,): 4.0, (3, 40): 9.0})}
    for name, proc in procs.items():
        want = [_hf(model, p, proc) for p in PROMPTS]
        assert want != [_hf(model, p, None) for p in PROMPTS], f"{name} changes nothing here: a weak test"
        assert _dk(model, [HFLogitsProcessor(proc)], num_steps) == want, name


def test_processors_in_speculative_windows_match_generate():
    """With a drafter the processors edit every window position (their drafts appended to
    the tokens they see); verification against the edited logits keeps generate's tokens."""
    model = tiny_model("llama")
    proc = SequenceBiasLogitsProcessor({(5, 9): -20.0, (11,): 4.0, (3, 40): 9.0})
    want = [_hf(model, p, proc) for p in PROMPTS]
    rows: list[int] = []

    def count(inputs: BatchProcessorInputs) -> None:
        rows.extend(b - a for a, b in zip(inputs.logit_offsets[:-1], inputs.logit_offsets[1:], strict=True))

    kw = dict(draft=NGramDraft(k=3, min_n=1), adaptive_k=False, batch_logits_processors=[count])
    assert _dk(model, [HFLogitsProcessor(proc)], 4, **kw) == want
    assert max(rows) > 1, "no window reached the processors: a weak test"
    proc2 = [HFLogitsProcessor(NoRepeatNGramLogitsProcessor(2))]
    assert _dk(model, proc2, 4, draft=NGramDraft(k=3, min_n=1), adaptive_k=False) == _dk(model, proc2, 4)


def test_window_rows_follow_their_token_prefixes():
    """Row j of a request's window share is the model's distribution after
    ``token_ids[: T - n + 1 + j]``: checked against cache-free forwards of those prefixes."""
    model = tiny_model("llama")
    shares: list[tuple[torch.Tensor, list[int]]] = []

    def record(inputs: BatchProcessorInputs) -> None:
        for b, tokens in enumerate(inputs.token_ids):
            lo, hi = inputs.logit_offsets[b], inputs.logit_offsets[b + 1]
            shares.append((inputs.logits[lo:hi].clone(), list(tokens)))

    _dk(model, [], 4, draft=NGramDraft(k=3, min_n=1), adaptive_k=False, batch_logits_processors=[record])
    windows = [(x, t) for x, t in shares if x.shape[0] > 1]
    assert windows, "no speculative window: a weak test"
    for x, tokens in windows[:6]:
        n, T = x.shape[0], len(tokens)
        for j in range(n):
            with torch.no_grad():
                ref = model(torch.tensor([tokens[: T - n + 1 + j]])).logits[0, -1]
            torch.testing.assert_close(x[j], ref, atol=1e-4, rtol=1e-4)


def test_batch_processor_rows_offsets_and_argmax_invariance():
    model = tiny_model("llama")
    seen: list[BatchProcessorInputs] = []

    def ban_7(inputs: BatchProcessorInputs) -> None:
        seen.append(inputs)
        inputs.logits[:, 7] = float("-inf")

    calls = {"greedy": 0, "sampled": 0}

    def invariant(inputs) -> None:
        calls["sampled" if not inputs.context.params.is_greedy else "greedy"] += 1
        inputs.logits += 1.0  # a shift: the argmax stays

    invariant.argmax_invariant = True
    gen = TokenGenerator(model, None, max_batch_size=2, max_seq_len=64, seed=0,
                         batch_logits_processors=[ban_7])
    ctxs = [gen.new_context(PROMPTS[0], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True),
                            logits_processors=[invariant]),
            gen.new_context(PROMPTS[1], SamplingParams(temperature=1.0, seed=1, max_new_tokens=8,
                                                       ignore_eos=True), logits_processors=[invariant])]
    gen.next_token({c.request_id: c for c in ctxs}, num_steps=8)
    assert all(7 not in c.generated_token_ids for c in ctxs)
    assert calls == {"greedy": 0, "sampled": 8}
    last = seen[-1]
    assert last.logit_offsets == [0, 1, 2] and last.logits.shape == (2, model.config.vocab_size)
    assert [len(t) for t in last.token_ids] == [len(p) + 7 for p in PROMPTS]  # tokens of this call too
    assert last.token_ids[0][: len(PROMPTS[0])] == PROMPTS[0]


def test_bad_processors_are_value_errors_naming_the_field():
    model = tiny_model("llama")
    gen = TokenGenerator(model, None, max_batch_size=1, max_seq_len=64)
    for bad, field in ((5, "logits_processors"), ([print, 3], r"logits_processors\[1\]")):
        with pytest.raises(ValueError, match=field):
            gen.new_context([5, 6], SamplingParams(max_new_tokens=4), logits_processors=bad)
    with pytest.raises(ValueError, match="batch_logits_processors"):
        TokenGenerator(model, None, max_batch_size=1, max_seq_len=64, batch_logits_processors=print)
    with pytest.raises(ValueError, match="HFLogitsProcessor"):
        HFLogitsProcessor(None)
