"""Seeded, bounded fuzzing of every entry point a hostile user reaches.

Default suite: a few hundred cases per target in seconds; ``-m slow``: thousands. Each
target's promise: bad input is a ``ValueError`` (or ``TypeError`` for a wrong type) that
names the problem, never another exception from deep inside, and anything accepted works.

- ``SamplingParams``: random (often extreme) fields; anything accepted samples on both
  backends, tokens in range and never banned, over nasty logits (NaN, +-inf, huge);
- the generator: random joins, cancels, releases, ``num_steps``, speculation and steering
  on tiny models; every seeded request equals its solo run;
- faults: a forward raises at a random point of a multi-step call; the retry streams the
  uninterrupted run's tokens;
- files: byte-flipped and truncated steering vectors (safetensors, GGUF);
- the CLI: random argument lists never print a traceback.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from _models import tiny_model, word_tokenizer

from decodekit import (
    DraftModel,
    NGramDraft,
    Sampler,
    SamplingParams,
    Steering,
    SteeringVector,
    TokenGenerator,
)

V = 64
NASTY = [0.0, -0.0, 1e-45, 1e-6, 1e-5, 0.5, 1.0, 2.0, 100.0, 1e30, 3.4e38, 1e39, 1e300, 10**400, -1.0, -1e30,
         math.inf, -math.inf, math.nan, True, None, "1", 7, -1, 2**31, 2**63, -(2**63)]


INT_FIELDS = ("top_k", "min_new_tokens", "max_new_tokens", "seed", "logprobs")


def _random_params(rng: random.Random) -> dict:
    kw: dict = {}
    pick = rng.choice
    for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                 "frequency_penalty", "presence_penalty", "top_k", "min_new_tokens", "max_new_tokens",
                 "seed", "logprobs"):
        if rng.random() < 0.25:
            kw[name] = pick(NASTY) if rng.random() < 0.15 else (
                rng.randint(0, 40) if name in INT_FIELDS else rng.uniform(0.01, 1.0))
    if rng.random() < 0.2:
        kw["logit_bias"] = {pick([0, 1, 2, 5, V - 1, V, -1, 3.5]): pick(NASTY + [-math.inf] * 4 + [2.0] * 8)
                            for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.2:
        kw["allowed_token_ids"] = rng.sample(range(V + 2), rng.randint(0, 4))
    if rng.random() < 0.2:
        kw["bad_words_token_ids"] = [[rng.randrange(-1, V + 1) for _ in range(rng.randint(0, 3))]
                                     for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.1:
        kw["stop_token_ids"] = [rng.randrange(V)]
    if rng.random() < 0.1:
        kw["stop_pattern"] = pick([r"\b", "a+", "(x+x+)+y", "(?<=a)", "[", "w1 w2", ""])
    return kw


def _nasty_logits(rng: random.Random, rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(rows, V, generator=g) * rng.choice([0.1, 1.0, 30.0])
    for _ in range(rng.randint(0, 6)):
        x[rng.randrange(rows), rng.randrange(V)] = rng.choice([math.nan, math.inf, -math.inf, 3e38, -3e38])
    if rng.random() < 0.1:
        x[rng.randrange(rows)] = rng.choice([math.nan, -math.inf])  # a whole row with nothing usable
    return x


def _fuzz_params(n: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    accepted = refused = 0
    samplers = {b: Sampler(V, 4, "cpu", backend=b) for b in ("torch", "triton")}
    for _ in range(n):
        kw = _random_params(rng)
        try:
            params = SamplingParams(**kw)
            samplers["torch"].check(params, [1, 2, 3])
        except (ValueError, TypeError):
            refused += 1
            continue
        accepted += 1
        logits = _nasty_logits(rng, 1)
        for s in samplers.values():
            s.add(0, params, [1, 2, 3])
            for _ in range(2):
                tok = int(s.sample(logits, [0]).token_ids[0])
                assert 0 <= tok < V, (kw, tok)
                if params.allowed_token_ids is not None:
                    assert tok in params.allowed_token_ids, (kw, tok)
                assert tok not in {w[0] for w in params.bad_words_token_ids or () if len(w) == 1}, (kw, tok)
                assert (params.logit_bias or {}).get(tok) != -math.inf, (kw, tok)
            s.remove(0)
    return accepted, refused


def test_fuzz_sampling_params():
    accepted, refused = _fuzz_params(60, 0)  # the interpreter: ~1 s per accepted one on triton
    assert accepted > 10 and refused > 10  # both sides of the validation were exercised


@pytest.mark.slow
def test_fuzz_sampling_params_many():
    accepted, refused = _fuzz_params(800, 1)  # the interpreter: ~1.6 s per accepted one on triton
    assert accepted > 120 and refused > 120


# --------------------------------------------------------------------------- the generator
def _solo(model, prompt, params, steering=None) -> list[int]:
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=96)
    c = gen.new_context(prompt, params, steering=steering)
    while not c.is_done:
        gen.next_token({c.request_id: c})
    return c.generated_token_ids


def _interleave(seed: int, n_requests: int) -> int:
    """Random joins, cancels, releases, num_steps, drafter switches and steering; a request
    that ran to the end must equal its solo run: every seeded one without a drafter, the
    greedy ones with one (speculation keeps sampled outputs exact in distribution, not token
    for token: which steps speculate depends on the batch). Returns the checked count."""
    rng = random.Random(seed)
    model = tiny_model(rng.choice(["llama", "qwen3", "gemma2"]))
    draft = rng.choice([None, NGramDraft(n=2, k=3), DraftModel(model)])
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=96, draft=draft)
    g = torch.Generator().manual_seed(seed)
    vec = SteeringVector({1: torch.randn(model.config.hidden_size, generator=g)})
    queue, live, done = [], {}, []
    for i in range(n_requests):
        p = [1] + [rng.randrange(3, 300) for _ in range(rng.randint(1, 8))]
        sp = SamplingParams(temperature=rng.choice([0.0, 0.8, 1.2]), seed=rng.randrange(1000),
                            top_p=rng.choice([1.0, 0.9]), repetition_penalty=rng.choice([1.0, 1.3]),
                            max_new_tokens=rng.randint(1, 10), ignore_eos=True)
        st = Steering(vec, 0.5) if rng.random() < 0.3 else None
        queue.append((f"q{i}", p, sp, st))
    checked = 0
    while queue or live:
        while queue and len(live) < 4 and rng.random() < 0.7:
            rid, p, sp, st = queue.pop()
            live[rid] = (gen.new_context(p, sp, rid, steering=st), p, sp, st)
        if live and rng.random() < 0.1:  # a cancel
            rid = rng.choice(list(live))
            gen.release(live.pop(rid)[0])
            continue
        for c, *_ in live.values():
            c.speculate = rng.random() < 0.8
        res = gen.next_token({rid: v[0] for rid, v in live.items()}, num_steps=rng.choice([1, 1, 2, 3]))
        for rid, r in res.items():
            if r.is_done:
                c, p, sp, st = live.pop(rid)
                gen.release(c)
                done.append((c, p, sp, st))
    for c, p, sp, st in done:
        if draft is None or sp.temperature == 0:
            assert c.generated_token_ids == _solo(model, p, sp, st), (c.request_id, sp, draft)
            checked += 1
    assert not gen.running and gen.free_slots == [0, 1, 2, 3]
    return checked


def test_fuzz_interleavings():
    assert sum(_interleave(s, 10) for s in range(3)) >= 10


@pytest.mark.slow
def test_fuzz_interleavings_many():
    assert sum(_interleave(100 + s, 24) for s in range(24)) >= 200


# --------------------------------------------------------------------------- faults
def _faulty_run(seed: int) -> None:
    """A forward raises once at a random point; the retried run equals the clean one."""
    rng = random.Random(seed)
    model = tiny_model("llama")
    draft = rng.choice([None, NGramDraft(n=2, k=3), DraftModel(model)])
    params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), seed=rng.randrange(99), max_new_tokens=8,
                             ignore_eos=True, repetition_penalty=1.2) for _ in range(3)]
    prompts = [[1, rng.randrange(3, 300), rng.randrange(3, 300)] for _ in range(3)]
    steps = rng.choice([1, 2, 4])

    def run(fail_at: int | None):
        gen = TokenGenerator(model, word_tokenizer(), max_batch_size=3, max_seq_len=64, draft=draft, seed=3)
        real, calls = gen.runner.forward, {"n": 0}

        def forward(*a, **k):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise RuntimeError("injected")
            return real(*a, **k)

        gen.runner.forward = forward
        ctxs = {f"r{i}": gen.new_context(p, sp, f"r{i}")
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))}
        streamed = {rid: [] for rid in ctxs}
        while any(not c.is_done for c in ctxs.values()):
            try:
                res = gen.next_token({r: c for r, c in ctxs.items() if not c.is_done}, num_steps=steps)
            except RuntimeError:
                continue
            for rid, r in res.items():
                streamed[rid] += [t.next_token for t in r.tokens]
        return streamed, calls["n"]

    clean, n = run(None)
    got, _ = run(rng.randint(1, n))
    assert got == clean


def test_fuzz_faults():
    for s in range(4):
        _faulty_run(s)


@pytest.mark.slow
def test_fuzz_faults_many():
    for s in range(100, 160):
        _faulty_run(s)


# --------------------------------------------------------------------------- files and the CLI
def _fuzz_files(tmp_path, n: int, seed: int) -> int:
    rng = random.Random(seed)
    refused = 0
    for suffix in (".safetensors", ".gguf"):
        path = tmp_path / f"v{suffix}"
        SteeringVector({i: torch.randn(32) for i in range(rng.randint(1, 4))}, method="pca").save(path)
        data = path.read_bytes()
        for _ in range(n):
            b = bytearray(data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data)
            for _ in range(rng.randint(1, 6)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
            path.write_bytes(bytes(b))
            try:
                SteeringVector.load(path)
            except ValueError:
                refused += 1
    return refused


def test_fuzz_steering_files(tmp_path):
    assert _fuzz_files(tmp_path, 150, 0) > 50


@pytest.mark.slow
def test_fuzz_steering_files_many(tmp_path):
    assert _fuzz_files(tmp_path, 1500, 1) > 500


CLI_WORDS = ["generate", "demo", "steer", "train", "hi", "--seed", "--device", "--draft", "--top-p",
             "--temperature", "--max-new-tokens", "--num-speculative-tokens", "--steer", "--vocab-size",
             "--steps", "--draws", "--backend", "--layers", "--pairs", "-o", "--model", "--top-k"]
CLI_VALUES = ["-1", "0", "1", "1e400", "nan", "inf", "99999999999999999999", "foo", "cuda", "cpu",
              "layerskip:0-99999999999", "layerskip:x", "ngram", "/nonexistent", "triton", "", "2"]


def _fuzz_cli(n: int, seed: int, capsys) -> int:
    from decodekit.cli import main
    rng = random.Random(seed)
    for _ in range(n):
        argv = [rng.choice(CLI_WORDS if rng.random() < 0.6 else CLI_VALUES) for _ in range(rng.randint(0, 6))]
        if "--model" not in argv and argv[:1] == ["generate"]:
            argv += ["--model", "/nonexistent"]  # never load a real model here
        if argv[:1] == ["demo"]:
            argv += ["--draws", "100", "--steps", "1", "--vocab-size", "128"]
        if argv[:2] == ["steer", "train"]:
            argv += ["--model", "/nonexistent"]
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        assert "Traceback" not in err, (argv, err)
        assert rc in (0, 2), (argv, rc, err)
    return n


def test_fuzz_cli(capsys):
    assert _fuzz_cli(200, 0, capsys) == 200


@pytest.mark.slow
def test_fuzz_cli_many(capsys):
    assert _fuzz_cli(2000, 1, capsys) == 2000
