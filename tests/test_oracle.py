"""The processed distribution against transformers' logits processors (the oracle).

For random logits, token histories and settings, ``decodekit.processed_probs`` (torch
backend, CPU) must equal softmax of: masks/bias -> RepetitionPenaltyLogitsProcessor
(prompt + output) -> OpenAI frequency/presence -> Temperature -> TopK -> TopP -> MinP ->
Typical, to 1e-5 absolute in fp32. fp16/bf16 logits are upcast first (oracle included).
Also: greedy rows are one-hot at the argmax of the penalised logits, and
``decodekit.sample`` only returns tokens of non-zero processed probability, whatever
the row holds (-inf, NaN, +inf).
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from _helpers import (
    banned_mask,
    oracle_masked_logits,
    oracle_penalized_logits,
    oracle_probs,
    random_logits,
    random_params,
    random_tokens,
)

import decodekit
from decodekit import SamplingParams

INF = math.inf
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# vocab size -> random settings per dtype (sort-based refs are slow at 151936)
SETTINGS = {111: 200, 32000: 40, 49152: 30, 151936: 12}


def _rng(*key) -> tuple[random.Random, torch.Generator]:
    seed = zlib.crc32(repr(key).encode())
    return random.Random(seed), torch.Generator().manual_seed(seed)


def _cases(V: int, dtype: torch.dtype, n: int, key, greedy: bool = False):
    """n random rows: (logits [n, V] in dtype, params, prompts, outputs)."""
    rng, gen = _rng(key, V, str(dtype), greedy)
    rows, params, prompts, outputs = [], [], [], []
    for _ in range(n):
        x = random_logits(rng, gen, V).to(dtype)
        top = x.float().topk(min(V, 12)).indices.tolist()
        p = random_params(rng, V, top, greedy=greedy)
        while not torch.isfinite(oracle_masked_logits(x, p)).any():
            p = random_params(rng, V, top, greedy=greedy)  # HF is undefined (NaN) there
        rows.append(x)
        params.append(p)
        prompts.append(random_tokens(rng, V, top, 40))
        outputs.append(random_tokens(rng, V, top, 20))
    return torch.stack(rows), params, prompts, outputs


def _describe(b, x, p, prompt, output) -> str:
    return (f"row {b}: dtype={x.dtype} V={x.shape[-1]} params={p!r}\n"
            f"  prompt={prompt}\n  output={output}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("V", list(SETTINGS))
def test_processed_probs_match_hf_oracle(V, dtype):
    dt = DTYPES[dtype]
    logits, params, prompts, outputs = _cases(V, dt, SETTINGS[V], "oracle")
    ours = decodekit.processed_probs(logits, params, prompt_token_ids=prompts,
                                     output_token_ids=outputs)
    assert ours.dtype == torch.float32 and ours.shape == (len(params), V)
    for b, p in enumerate(params):
        expect = oracle_probs(logits[b], p, prompts[b], outputs[b])
        msg = _describe(b, logits[b], p, prompts[b], outputs[b])
        torch.testing.assert_close(ours[b], expect, atol=1e-5, rtol=0,
                                   msg=lambda m, msg=msg: f"{m}\n{msg}")
        banned = banned_mask(p, V)
        assert (ours[b][banned] == 0).all(), f"masked token got probability\n{msg}"


def test_oracle_grid_is_exercised():
    """The random grid above really reaches every filter, penalty and mask, and its rows
    are not degenerate: most keep several tokens, and at large V some top-p and
    typical-p rows keep thousands (past any partial-sort shortcut)."""
    seen = set()
    kept = {"any": [], "top_p": [], "typical": []}
    for V, n in SETTINGS.items():
        for dtype in DTYPES.values():
            logits, params, prompts, outputs = _cases(V, dtype, n, "oracle")
            for b, p in enumerate(params):
                k = int((oracle_probs(logits[b], p, prompts[b], outputs[b]) > 0).sum())
                kept["any"].append(k)
                if V > 10_000 and p.top_p < 1:
                    kept["top_p"].append(k)
                if V > 10_000 and p.typical_p < 1:
                    kept["typical"].append(k)
            for p, o in zip(params, outputs, strict=True):
                seen |= {name for name, on in [
                    ("top_k", 0 < p.top_k < V), ("top_p", p.top_p < 1), ("min_p", p.min_p > 0),
                    ("typical", p.typical_p < 1), ("rep", p.repetition_penalty != 1),
                    ("freq", p.frequency_penalty != 0 and bool(o)),
                    ("pres", p.presence_penalty != 0 and bool(o)),
                    ("bias", p.logit_bias is not None),
                    ("allowed", p.allowed_token_ids is not None),
                    ("bad", p.bad_words_token_ids is not None)] if on}
    assert seen == {"top_k", "top_p", "min_p", "typical", "rep", "freq", "pres", "bias",
                    "allowed", "bad"}
    assert sum(k >= 2 for k in kept["any"]) > 0.5 * len(kept["any"])
    assert sum(k > 2000 for k in kept["top_p"]) >= 3, kept["top_p"]
    assert sum(k > 2000 for k in kept["typical"]) >= 3, kept["typical"]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("V", [111, 32000])
def test_greedy_is_one_hot_at_argmax_of_penalised_logits(V, dtype):
    n = 24 if V == 111 else 8
    logits, params, prompts, outputs = _cases(V, DTYPES[dtype], n, "greedy", greedy=True)
    ours = decodekit.processed_probs(logits, params, prompt_token_ids=prompts,
                                     output_token_ids=outputs)
    toks = decodekit.sample(logits, params, prompt_token_ids=prompts, output_token_ids=outputs)
    for b, p in enumerate(params):
        msg = _describe(b, logits[b], p, prompts[b], outputs[b])
        x = oracle_penalized_logits(logits[b], p, prompts[b], outputs[b])
        assert ours[b].sum() == 1.0 and int((ours[b] != 0).sum()) == 1, msg
        t = int(ours[b].argmax())
        assert x[t] == x.max(), f"one-hot at {t} ({x[t]}) but max is {x.max()}\n{msg}"
        assert int(toks[b]) == t, msg


def test_greedy_penalties_change_the_argmax():
    """Penalties and bias act on greedy rows (guards against greedy skipping them)."""
    x = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]])
    cases = [
        (SamplingParams(temperature=0), [], [], 0),
        (SamplingParams(temperature=0, repetition_penalty=1.3), [0], [], 1),   # 5/1.3 < 4
        (SamplingParams(temperature=0, repetition_penalty=1.3), [], [0], 1),
        (SamplingParams(temperature=0, frequency_penalty=0.6), [], [0, 0], 1),  # 5 - 1.2 < 4
        (SamplingParams(temperature=0, presence_penalty=1.5), [], [0], 1),
        (SamplingParams(temperature=0, presence_penalty=1.5), [0], [], 0),  # prompt not counted
        (SamplingParams(temperature=0, logit_bias={2: 2.5}), [], [], 2),
        (SamplingParams(temperature=0, allowed_token_ids=[3, 4]), [], [], 3),
        (SamplingParams(temperature=0, bad_words_token_ids=[[0]]), [], [], 1),
    ]
    for p, prompt, out, want in cases:
        got = decodekit.sample(x, p, prompt_token_ids=[prompt], output_token_ids=[out])
        assert int(got) == want, (p, prompt, out)


@pytest.mark.parametrize(
    "params, prompt, output, logits, expected",
    [
        # HF repetition penalty: positive logits divided, negative multiplied, prompt counts.
        (SamplingParams(repetition_penalty=2.0), [0, 1], [], [2.0, -1.0, 0.5],
         [1.0, -2.0, 0.5]),
        # OpenAI: frequency * count + presence * (count > 0), output tokens only.
        (SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), [2], [0, 0, 1],
         [1.0, 1.0, 1.0], [1.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25, 1.0]),
        # Both, and temperature applied after them.
        (SamplingParams(temperature=0.5, repetition_penalty=2.0, frequency_penalty=1.0),
         [], [0], [4.0, 0.0, -4.0], [(2.0 - 1.0) / 0.5, 0.0, -8.0]),
    ],
)
def test_penalty_arithmetic_by_hand(params, prompt, output, logits, expected):
    """Hand-computed expectations for the penalties (independent of transformers)."""
    got = decodekit.processed_probs(torch.tensor([logits]), params, prompt_token_ids=[prompt],
                                    output_token_ids=[output])[0]
    want = torch.softmax(torch.tensor(expected), -1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- sample validity
def _special_row(kind: str, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    x = x.clone()
    V = x.shape[0]
    if kind == "all_-inf":
        x[:] = -INF
    elif kind == "all_nan":
        x[:] = math.nan
    elif kind == "some_nan":
        for t in rng.sample(range(V), max(1, V // 10)):
            x[t] = math.nan
        x[int(x.nan_to_num(-INF).argmax())] = math.nan  # the best token is NaN
    elif kind == "some_-inf":
        for t in rng.sample(range(V), max(1, V // 3)):
            x[t] = -INF
    elif kind == "nan_and_-inf":
        for t in rng.sample(range(V), max(2, V // 3)):
            x[t] = rng.choice([-INF, math.nan])
    return x


KINDS = ["plain", "plain", "all_-inf", "all_nan", "some_nan", "some_-inf", "nan_and_-inf"]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("V", [111, 4000])
def test_sample_returns_tokens_of_positive_probability(V, dtype):
    dt = DTYPES[dtype]
    rng, gen = _rng("valid", V, dtype)
    for _ in range(4 if V == 111 else 2):
        rows, params, prompts, outputs, kinds = [], [], [], [], []
        for _ in range(48 if V == 111 else 16):
            x = random_logits(rng, gen, V)
            top = x.topk(12).indices.tolist()
            kind = rng.choice(KINDS)
            rows.append(_special_row(kind, x, rng).to(dt))
            kinds.append(kind)
            params.append(random_params(rng, V, top, greedy=rng.random() < 0.15,
                                        seed=rng.choice([None, rng.randrange(2**63)])))
            prompts.append(random_tokens(rng, V, top, 30))
            outputs.append(random_tokens(rng, V, top, 10))
        logits = torch.stack(rows)
        kw = dict(prompt_token_ids=prompts, output_token_ids=outputs)
        probs = decodekit.processed_probs(logits, params, **kw)
        toks = decodekit.sample(logits, params, step=rng.choice([0, 1, 7]), **kw)
        assert toks.dtype == torch.int64 and toks.shape == (len(params),)
        for b, (p, kind) in enumerate(zip(params, kinds, strict=True)):
            msg = f"{kind}: " + _describe(b, logits[b], p, prompts[b], outputs[b])
            t = int(toks[b])
            assert 0 <= t < V, msg
            banned = banned_mask(p, V)
            assert not banned[t], f"sampled masked token {t}\n{msg}"
            assert torch.isfinite(probs[b]).all(), f"non-finite probabilities\n{msg}"
            assert probs[b, t] > 0, f"sampled token {t} of probability {probs[b, t]}\n{msg}"
            torch.testing.assert_close(probs[b].sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
            if kind in ("all_-inf", "all_nan"):
                if p.is_greedy:
                    assert int(probs[b].argmax()) == t and probs[b, t] == 1.0, msg
                else:
                    # nothing finite: uniform over the tokens the masks allow
                    want = (~banned).float() / (~banned).sum()
                    torch.testing.assert_close(probs[b], want, atol=1e-6, rtol=0, msg=msg)


def test_nan_logits_never_sampled_when_a_finite_token_exists():
    V = 50
    x = torch.full((1, V), math.nan)
    x[0, 17] = -30.0  # the only finite logit, and a very unlikely one
    for seed in range(200):
        p = SamplingParams(seed=seed, temperature=1.7, typical_p=0.9 if seed % 2 else 1.0)
        assert int(decodekit.sample(x, p)) == 17


@pytest.mark.parametrize("params", [
    SamplingParams(seed=3),
    SamplingParams(seed=3, typical_p=0.9),
    SamplingParams(seed=3, top_p=0.5, min_p=0.1),
    SamplingParams(seed=3, top_k=2, typical_p=0.5),
    SamplingParams(seed=3, temperature=0),
], ids=["plain", "typical", "top_p+min_p", "top_k+typical", "greedy"])
def test_positive_infinity_logit_wins(params):
    """+inf logits (also next to -inf / NaN ones) are the whole distribution."""
    V = 16
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    x[0, 5] = INF
    x[0, 2] = -INF
    x[0, 9] = math.nan
    probs = decodekit.processed_probs(x, params)
    want = torch.zeros(1, V)
    want[0, 5] = 1.0
    torch.testing.assert_close(probs, want, atol=0, rtol=0)
    assert int(decodekit.sample(x, params)) == 5


@pytest.mark.parametrize("typical_p", [0.9, 0.5])
@pytest.mark.parametrize("mask", ["logit_bias", "allowed_token_ids", "bad_words"])
def test_typical_p_with_masked_tokens(mask, typical_p):
    """Typical-p over a row with masked (-inf) tokens: the masked tokens must simply drop
    out (HF's TypicalLogitsWarper handles -inf scores with nansum)."""
    V = 8
    x = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    kw = {"logit_bias": {"logit_bias": {0: -INF}},
          "allowed_token_ids": {"allowed_token_ids": list(range(1, V))},
          "bad_words": {"bad_words_token_ids": [[0]]}}[mask]
    p = SamplingParams(typical_p=typical_p, seed=0, **kw)
    got = decodekit.processed_probs(x, p)[0]
    torch.testing.assert_close(got, oracle_probs(x[0], p), atol=1e-6, rtol=0)
    for seed in range(50):
        assert int(decodekit.sample(x, p.replace(seed=seed))) != 0


def test_multi_token_bad_words_and_min_new_tokens_are_zero_probability():
    V = 40
    rng, gen = _rng("badseq")
    for trial in range(30):
        x = random_logits(rng, gen, V)
        top = x.topk(12).indices.tolist()
        prompt = random_tokens(rng, V, top, 8) + [rng.choice(top)]
        output = [rng.choice(top) for _ in range(rng.randint(0, 3))]
        hist = prompt + output
        a, b = rng.sample(top[:5], 2)
        # [last, a] and [second-to-last, last, b] match the history: a and b are banned now.
        # [V-1, V-2, top0] matches only if the history ends with V-1, V-2.
        words = [[hist[-1], a], [hist[-2] if len(hist) > 1 else V - 1, hist[-1], b],
                 [V - 1, V - 2, top[0]]]
        prefix_ok = hist[-2:] == [V - 1, V - 2]
        eos = rng.choice(top[:3])
        p = SamplingParams(seed=trial, temperature=rng.uniform(0.5, 2), bad_words_token_ids=words,
                           min_new_tokens=len(output) + 1, top_p=rng.choice([1.0, 0.9]))
        kw = dict(prompt_token_ids=[prompt], output_token_ids=[output], eos_token_ids=[eos])
        probs = decodekit.processed_probs(x[None], p, **kw)[0]
        banned = {a, eos} | ({b} if len(hist) > 1 else set())
        if prefix_ok:
            banned.add(top[0])
        elif top[0] not in banned:
            assert probs[top[0]] > 0, (trial, words, hist)  # an unmatched word bans nothing
        for t in banned:
            assert probs[t] == 0, (trial, t, words, hist)
        tok = int(decodekit.sample(x[None], p, **kw))
        assert tok not in banned and probs[tok] > 0
