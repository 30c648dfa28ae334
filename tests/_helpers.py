"""Shared test helpers: an independent oracle for the processed distribution.

The oracle is built from transformers' own logits processors (the spec says the
sampler's pipeline *is* theirs, plus OpenAI's frequency/presence penalties), applied
to ``logits.float()`` one row at a time. Nothing here calls decodekit's processing
code, so the expected values never come from the code under test.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from decodekit import SamplingParams

INF = math.inf

__all__ = [
    "banned_mask",
    "counting_capture",
    "oracle_masked_logits",
    "oracle_penalized_logits",
    "oracle_probs",
    "random_logits",
    "random_params",
    "random_tokens",
]


def banned_mask(params: SamplingParams, vocab_size: int) -> torch.Tensor:
    """Bool ``[V]``: tokens the static masks forbid (allowed_token_ids, -inf logit_bias,
    single-token bad words). Multi-token bad words and min_new_tokens are not included."""
    banned = torch.zeros(vocab_size, dtype=torch.bool)
    if params.allowed_token_ids is not None:
        banned[:] = True
        banned[list(params.allowed_token_ids)] = False
    for t, b in (params.logit_bias or {}).items():
        if b == -INF:
            banned[t] = True
    for word in params.bad_words_token_ids or ():
        if len(word) == 1:
            banned[word[0]] = True
    return banned


def oracle_masked_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Step 1 of the spec, in plain torch: fp32 ``[V]`` with bias added and masks at -inf."""
    x = logits.float().clone()
    for t, b in (params.logit_bias or {}).items():
        if b != -INF:
            x[t] = x[t] + b
    x[banned_mask(params, x.shape[-1])] = -INF
    return x


def oracle_penalized_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> torch.Tensor:
    """Steps 1-3: masks, HF repetition penalty (prompt + output), OpenAI freq/presence."""
    V = logits.shape[-1]
    x = oracle_masked_logits(logits, params)[None, :]
    seen = list(prompt) + list(output)
    if params.repetition_penalty != 1.0 and seen:
        proc = RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty))
        x = proc(torch.tensor([seen], dtype=torch.long), x)
    if output and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long), minlength=V).float()
        x = x - counts[None] * params.frequency_penalty
        x = x - (counts[None] > 0).float() * params.presence_penalty
    return x[0]


def oracle_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> torch.Tensor:
    """Steps 1-5 with transformers' warpers; fp32 ``[V]``, filtered tokens at -inf.

    Top-p ties: HF sorts and cuts inside a group of equal logits in whatever order
    the sort left them (fp16/bf16 logits tie a lot); the spec keeps every token
    tied with the smallest kept one, so the oracle closes the kept set over ties.
    """
    assert params.temperature > 0, "greedy rows: use oracle_penalized_logits + argmax"
    x = oracle_penalized_logits(logits, params, prompt, output)[None, :]
    ids = torch.zeros(1, 1, dtype=torch.long)  # unused by the warpers
    x = TemperatureLogitsWarper(float(params.temperature))(ids, x)
    if params.top_k > 0:
        x = TopKLogitsWarper(int(params.top_k))(ids, x)
    if params.top_p < 1.0:
        before = x
        x = TopPLogitsWarper(float(params.top_p))(ids, x)
        kept = x > -INF
        if kept.any():
            lowest = x[kept].min()
            x = torch.where(before >= lowest, before, x)
    if params.min_p > 0.0:
        x = MinPLogitsWarper(float(params.min_p))(ids, x)
    if params.typical_p < 1.0:
        x = TypicalLogitsWarper(float(params.typical_p))(ids, x)
    return x[0]


def oracle_probs(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
) -> torch.Tensor:
    """The spec's processed distribution of one row, fp32 ``[V]`` (one-hot for greedy)."""
    if params.temperature == 0:
        x = oracle_penalized_logits(logits, params, prompt, output)
        out = torch.zeros_like(x)
        out[int(x.argmax())] = 1.0
        return out
    return torch.softmax(oracle_logits(logits, params, prompt, output), -1)


# --------------------------------------------------------------------------- random cases
def random_logits(rng: random.Random, gen: torch.Generator, vocab_size: int) -> torch.Tensor:
    """fp32 ``[V]``: gaussian * {1, 3, 8}, or a peaked row (a few tokens far ahead), or
    gaussian * 3 with a tenth of the tokens at -inf (as a model's own mask would leave)."""
    kind = rng.choice(["g1", "g1", "g3", "g3", "g8", "peaked", "peaked", "partly_-inf"])
    x = torch.randn(vocab_size, generator=gen)
    if kind == "partly_-inf":
        x = x * 3.0
        x[torch.randperm(vocab_size, generator=gen)[: vocab_size // 10]] = -INF
        return x
    if kind == "peaked":
        x = x * 2.0
        n = rng.randint(1, min(5, vocab_size))
        for t in rng.sample(range(vocab_size), n):
            x[t] += rng.uniform(3.0, 12.0)
        return x
    return x * {"g1": 1.0, "g3": 3.0, "g8": 8.0}[kind]


def random_tokens(rng: random.Random, vocab_size: int, top: Sequence[int], n_max: int) -> list[int]:
    """Up to ``n_max`` token ids, half of them from ``top`` (likely tokens, so that the
    penalties change the outcome) and with repeats (so that counts exceed 1)."""
    n = rng.randint(0, n_max)
    pool = list(top[:8]) + [rng.randrange(vocab_size) for _ in range(6)]
    return [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(vocab_size)
            for _ in range(n)]


def random_params(
    rng: random.Random,
    vocab_size: int,
    top: Sequence[int],
    *,
    greedy: bool = False,
    masks: bool = True,
    seed: int | None = None,
) -> SamplingParams:
    """Random settings over the grid of the spec; ``top`` = likely token ids."""
    V = vocab_size

    def pick_(off, *on):  # each setting is off half of the time, so rows keep > 1 token
        return off if rng.random() < 0.5 else rng.choice(on)

    kw: dict = dict(
        temperature=0.0 if greedy else rng.uniform(0.3, 2.0),
        top_k=pick_(0, 1, 5, 50, V + 10),
        top_p=pick_(1.0, 0.95, 0.7, 0.3),
        min_p=pick_(0.0, 0.02, 0.1),
        typical_p=pick_(1.0, 0.9, 0.5),
        repetition_penalty=pick_(1.0, 1.3, 0.8),
        frequency_penalty=pick_(0.0, 0.5, -0.3),
        presence_penalty=pick_(0.0, 0.5, -0.3),
        seed=seed,
    )
    likely = list(top[:10])
    pick = lambda: rng.choice(likely) if rng.random() < 0.6 else rng.randrange(V)  # noqa: E731
    if masks and rng.random() < 0.3:
        kw["logit_bias"] = {pick(): rng.choice([-5.0, 2.5, 10.0, -INF])
                            for _ in range(rng.randint(1, 4))}
    if masks and rng.random() < 0.2:
        n = rng.randint(1, min(V, 60))
        kw["allowed_token_ids"] = sorted({pick() for _ in range(n)})
    if masks and rng.random() < 0.2:
        kw["bad_words_token_ids"] = [[pick()] for _ in range(rng.randint(1, 3))]
    params = SamplingParams(**kw)
    if bool(banned_mask(params, V).all()):  # nothing left: drop the bans
        params = params.replace(logit_bias=None, bad_words_token_ids=None)
    return params


def bitmask_words(allowed: torch.Tensor) -> torch.Tensor:
    """bool ``[B, V]`` -> the guided-decoding bitmask int32 ``[B, ceil(V / 32)]`` (bit
    ``i % 32`` of word ``i // 32``: xgrammar's layout), packed here independently of decodekit."""
    B, V = allowed.shape
    W = -(-V // 32)
    padded = torch.zeros(B, W * 32, dtype=torch.int64)
    padded[:, :V] = allowed.long()
    words = (padded.view(B, W, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def counting_capture(replays: dict):
    """A graph capture that runs the captured forward eagerly (``eager_capture``) and counts
    each replay in ``replays["n"]``: what a CPU test uses to see which graph set a step took."""
    from decodekit.engine.graphs import eager_capture

    def capture(fn, device):
        replay, out = eager_capture(fn, device)

        def run():
            replays["n"] += 1
            replay()
        return run, out
    return capture
