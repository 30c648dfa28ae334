"""Per-request steering inside the TokenGenerator: mixed batches equal each request run
alone, unsteered rows bit-identical to a generator without steering, absolute positions
under the slot KV cache (checked against cache-free re-runs), slot reuse, speculative
decoding with steering, and the errors."""

from __future__ import annotations

import pytest
import torch
from _helpers import counting_capture
from _models import tiny_model, word_tokenizer
from test_speculative import make_draft

from decodekit import SamplingParams, Steering, SteeringVector, TokenGenerator, steer

pytestmark = pytest.mark.usefixtures("one_thread")


H = 64  # tiny models' hidden size


def vec(seed: int, layers=(0, 1), scale: float = 3.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: scale * torch.randn(H, generator=g) / H**0.5 for i in layers})


PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40, 41], [1, 70, 71, 72, 73], [1, 100, 101, 102]]


def _params(n=10, **kw):
    return SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, logprobs=0, **kw)


def _generate(gen, prompts, steerings, params=None, num_steps=2):
    """Run the prompts together; returns (token ids, chosen-token logprobs) per request."""
    ctxs = [gen.new_context(p, params or _params(), steering=s)
            for p, s in zip(prompts, steerings, strict=True)]
    while any(not c.is_done for c in ctxs):
        gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=num_steps)
    for c in ctxs:
        gen.release(c)
    return [(c.generated_token_ids, [lp.token_log_probabilities[0] for lp in c.logprobs]) for c in ctxs]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_mixed_batch_equals_each_request_alone(arch):
    model = tiny_model(arch)
    steerings = [Steering(vec(1), 1.0), None, Steering(vec(2, (1,)), 2.0, op="clamp"),
                 Steering(vec(3), 1.0, op="ablate", positions="generated")]
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64)
    mixed = _generate(gen, PROMPTS, steerings)
    plain = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, steering=False)
    base = _generate(plain, PROMPTS, [None] * 4)
    # the unsteered row is bit-identical to a generator without steering hooks at all
    assert mixed[1] == base[1]
    for i, s in enumerate(steerings):
        alone = _generate(TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64),
                          [PROMPTS[i]], [s])[0]
        assert mixed[i][0] == alone[0]
        torch.testing.assert_close(torch.tensor(mixed[i][1]), torch.tensor(alone[1]), atol=1e-5, rtol=0)
        if s is not None:  # and steering did something
            assert mixed[i][0] != base[i][0] or mixed[i][1] != base[i][1]


def test_zero_strength_and_cancelled_vector_give_the_baseline():
    model = tiny_model("llama")
    v = vec(4)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64)
    got = _generate(gen, PROMPTS[:3], [Steering(v, 0.0), Steering(v - v, 3.0), None])
    plain = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, steering=False)
    base = _generate(plain, PROMPTS[:3], [None] * 3)
    assert got == base


@pytest.mark.parametrize("positions", ["generated", "prompt", slice(3, 9), "all"])
def test_absolute_positions_under_the_kv_cache(positions):
    """Each greedy token equals the argmax of a cache-free forward of the whole sequence so
    far, steered at the same absolute positions (decode steps, num_steps > 1, joins)."""
    model = tiny_model("llama")
    v = vec(5, scale=6.0)
    s = Steering(v, 1.0, positions=positions)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64)
    (toks, _), = _generate(gen, [PROMPTS[0]], [s], params=_params(12), num_steps=3)
    P = len(PROMPTS[0])
    named = {"generated": slice(P, None), "prompt": slice(0, P), "all": slice(0, None)}
    window = positions if isinstance(positions, slice) else named[positions]
    seq = list(PROMPTS[0])
    with torch.no_grad(), steer(model, v, 1.0, positions=window):
        for t in toks:
            logits = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
            assert int(logits.argmax()) == t
            seq.append(t)
    with torch.no_grad():  # and the steering mattered for this sequence
        plain = [int(model(torch.tensor([seq[:i]]), use_cache=False).logits[0, -1].argmax())
                 for i in range(P, len(seq))]
    assert plain != toks


def test_generated_positions_match_steer_with_generate():
    """The generator and ``decodekit.steer`` around ``model.generate`` agree on where
    "generated" starts (both count absolute positions)."""
    model = tiny_model("qwen3")
    v = vec(6, scale=6.0)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64)
    (toks, _), = _generate(gen, [PROMPTS[2]], [Steering(v, 1.5, positions="generated")], params=_params(10))
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad(), steer(model, v, 1.5, positions="generated"):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             min_new_tokens=10, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() == toks


def test_slot_reuse_clears_the_steering():
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64)
    steered = _generate(gen, [PROMPTS[1]], [Steering(vec(7), 2.0)])[0]
    after = _generate(gen, [PROMPTS[1]], [None])[0]  # same slot, now unsteered
    plain = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64, steering=False)
    assert after == _generate(plain, [PROMPTS[1]], [None])[0]
    assert steered != after
    # a cancelled steered request clears its row too
    ctx = gen.new_context(PROMPTS[1], _params(), steering=Steering(vec(7), 2.0))
    gen.next_token({ctx.request_id: ctx})
    gen.release(ctx)
    assert not gen.runner.hooks.active
    assert _generate(gen, [PROMPTS[1]], [None])[0] == after
    # the row is cleared by slot, whatever ctx.steering says when the request ends
    ctx = gen.new_context(PROMPTS[1], _params(), steering=Steering(vec(7), 2.0))
    gen.next_token({ctx.request_id: ctx})
    ctx.steering = None
    gen.release(ctx)
    assert not gen.runner.hooks.active
    assert _generate(gen, [PROMPTS[1]], [None])[0] == after
    # a steering changed to an unfitting vector before admission is refused, nothing admitted
    ctx = gen.new_context(PROMPTS[1], _params())
    ctx.steering = Steering({0: torch.ones(32)})
    with pytest.raises(ValueError, match="hidden size 32"):
        gen.next_token({ctx.request_id: ctx})
    assert gen.free_slots == [0] and not gen.runner.hooks.active and ctx.slot is None


@pytest.mark.parametrize("kind", ["ngram", "model", "layerskip"])
def test_speculative_greedy_equals_plain_steered_greedy(kind):
    model = tiny_model("llama")
    steerings = [Steering(vec(8), 1.0), None, Steering(vec(9, (1,)), 1.0, positions="generated")]
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 40, 41, 40, 41], [1, 9, 10, 9, 10, 9]]
    params = _params(16)
    plain = _generate(TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64),
                      prompts, steerings, params=params)
    spec_gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64,
                              draft=make_draft(kind, model, k=3), adaptive_k=False)
    spec = _generate(spec_gen, prompts, steerings, params=params)
    assert [t for t, _ in spec] == [t for t, _ in plain]
    assert spec_gen.spec_stats.drafted > 0


def test_steering_errors():
    model = tiny_model("llama")
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64)
    with pytest.raises(ValueError, match="hidden size 32"):
        gen.new_context(PROMPTS[0], _params(), steering=Steering({0: torch.ones(32)}))
    with pytest.raises(ValueError, match="layer 5"):
        gen.new_context(PROMPTS[0], _params(), steering=Steering({5: torch.ones(H)}))
    with pytest.raises(TypeError, match="decodekit.Steering"):
        gen.new_context(PROMPTS[0], _params(), steering={0: torch.ones(H)})
    off = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64, steering=False)
    with pytest.raises(ValueError, match="steering=False"):
        off.new_context(PROMPTS[0], _params(), steering=Steering(vec(1)))
    assert gen.free_slots == [0, 1] and not gen.runner.hooks.active  # nothing admitted


def test_steered_batches_replay_decode_graphs():
    """With decode graphs (simulated on CPU: the captured forwards replayed eagerly on the
    same static buffers), steered and mixed batches replay the steered graph set, captured
    before any request existed, instead of running eagerly, and give the tokens and
    logprobs of the eager generator; unsteered batches keep the plain set. Control: the
    steering changes the tokens, so a graph without it would fail."""
    replays = {"n": 0}
    counting = counting_capture(replays)

    model = tiny_model("llama")
    steerings = [Steering(vec(1), 1.0), None, Steering(vec(2, (1,)), 2.0, op="clamp"),
                 Steering(vec(3), 1.0, op="ablate", positions="generated")]
    eager = _generate(TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64),
                      PROMPTS, steerings, num_steps=1)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    gen.runner.enable_graphs(capture=counting)
    assert gen.runner.steered_graphs is not None and not gen.runner.steered_graphs.failed
    graphed = _generate(gen, PROMPTS, steerings, num_steps=1)
    assert replays["n"] == 9  # 10 tokens: one from the prefill, then 9 decode steps, all replayed
    for (tok_g, lp_g), (tok_e, lp_e) in zip(graphed, eager, strict=True):
        assert tok_g == tok_e
        torch.testing.assert_close(torch.tensor(lp_g), torch.tensor(lp_e), atol=1e-5, rtol=0)
    unsteered = _generate(gen, PROMPTS, [None] * 4, num_steps=1)
    assert unsteered[1] == graphed[1] and unsteered[0][0] != graphed[0][0]
    assert replays["n"] == 18
