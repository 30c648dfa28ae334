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


# ------------------------------------------------------------------------------------ engine
def _gen(**kw):
    from _models import tiny_model

    from decodekit import TokenGenerator
    kw.setdefault("max_batch_size", 4)
    kw.setdefault("max_seq_len", 64)
    return TokenGenerator(tiny_model("llama"), word_tokenizer(), **kw)


def _params():
    return [SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True),
            SamplingParams(temperature=0.9, top_p=0.9, repetition_penalty=1.3, seed=5, max_new_tokens=12,
                           ignore_eos=True, bad_words_token_ids=[[7, 8]]),
            SamplingParams(temperature=1.0, presence_penalty=0.5, max_new_tokens=12, ignore_eos=True)]


PROMPTS = [[1, 5, 6, 7, 5, 6], [1, 9, 10, 11], [1, 20, 21, 20, 21, 20]]


def _drive(gen, num_steps, fail_at=None, monkeypatch=None):
    """Run the three requests to the end; the ``fail_at``-th forward raises once. Returns each
    request's streamed tokens and its context's tokens."""
    ctxs = [gen.new_context(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(PROMPTS, _params(), strict=True))]
    streamed = {c.request_id: [] for c in ctxs}
    calls = {"n": 0, "failed": 0}
    if fail_at is not None:
        real = gen.runner.forward

        def flaky(*a, **k):
            calls["n"] += 1
            if calls["n"] == fail_at:
                calls["failed"] += 1
                raise RuntimeError("transient out of memory")
            return real(*a, **k)

        monkeypatch.setattr(gen.runner, "forward", flaky)
    batch = {c.request_id: c for c in ctxs}
    while batch:
        try:
            res = gen.next_token(batch, num_steps=num_steps)
        except RuntimeError as e:
            assert "transient" in str(e)
            continue  # retry the same call
        for rid, r in res.items():
            streamed[rid] += [t.next_token for t in r.tokens]
            if r.is_done:
                gen.release(batch.pop(rid))
    assert fail_at is None or calls["failed"] == 1
    return {c.request_id: (streamed[c.request_id], list(c.generated_token_ids)) for c in ctxs}


def _count_forwards(gen, monkeypatch) -> dict:
    calls = {"n": 0}
    real = gen.runner.forward

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(gen.runner, "forward", counting)
    return calls


@pytest.mark.parametrize("draft", [None, "ngram", "model"])
@pytest.mark.parametrize("where", [0.0, 0.1, 0.5, 0.9])
def test_03_failed_call_is_rolled_back_and_a_retry_gives_the_same_tokens(draft, where, monkeypatch):
    """A target forward raises part-way through a 4-step call (at the first forward, a
    prefill, or 10% / 50% / 90% into the run): the retry must stream exactly the tokens of an
    uninterrupted run, for greedy, seeded and unseeded requests with penalties and multi-token
    bad words, with and without a drafter."""
    from _models import tiny_model

    from decodekit import DraftModel, NGramDraft

    def make():
        d = None if draft is None else NGramDraft(n=2, k=3) if draft == "ngram" else DraftModel(
            tiny_model("llama"))
        return _gen(seed=7, draft=d, adaptive_k=False)

    gen = make()
    calls = _count_forwards(gen, monkeypatch)
    want = _drive(gen, 4)
    got = _drive(make(), 4, 1 + int(where * (calls["n"] - 1)), monkeypatch)
    assert got == want
    for streamed, kept in got.values():
        assert streamed == kept and len(kept) == 12  # nothing lost, nothing twice


def test_04_release_of_a_queued_context_touches_only_it():
    gen, other = _gen(), _gen()
    # ignore_eos: a sampled EOS as the first token would end it (and free its slot) at once
    running = gen.new_context([1, 5, 6], SamplingParams(max_new_tokens=8, ignore_eos=True), "x")
    gen.next_token({"x": running})
    queued = other.new_context([1, 7, 8], SamplingParams(max_new_tokens=8), "x")  # same id, elsewhere
    gen.release(queued)
    assert queued.is_done and running.slot is not None and not running.is_done
    assert gen.running == {"x": running}


def test_05_concurrent_calls_are_serialised():
    """Two threads drive their own seeded requests on one generator: each gets exactly its
    solo-run tokens (the generator's lock serialises the calls)."""
    import threading

    def solo(p, sp):
        g = _gen(max_batch_size=1)
        c = g.new_context(p, sp)
        while not c.is_done:
            g.next_token({c.request_id: c})
        return c.generated_token_ids

    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=20, ignore_eos=True) for s in (1, 2)]
    want = [solo(p, sp) for p, sp in zip(PROMPTS, params, strict=False)]
    gen = _gen()
    got, errors = [None, None], []

    def worker(i):
        try:
            c = gen.new_context(PROMPTS[i], params[i], f"t{i}")
            while not c.is_done:
                gen.next_token({c.request_id: c})
            got[i] = c.generated_token_ids
        except Exception as e:  # pragma: no cover - the failure being tested
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and got == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_09_sampler_checks_tensor_slots_and_rollbacks(backend):
    s = Sampler(50, 4, "cpu", backend=backend)
    s.add(0, SamplingParams(seed=1, repetition_penalty=1.2, bad_words_token_ids=[[3, 4]]), [1, 2])
    s.add(1, SamplingParams(seed=2))
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(9))
    for bad, err in ((torch.tensor([0, 7]), ValueError), (torch.tensor([0, -1]), ValueError),
                     (torch.tensor([0, 2]), KeyError), (torch.tensor([1, 1]), ValueError),
                     (torch.tensor([0.0, 1.0]), ValueError)):
        with pytest.raises(err):
            s.sample(x, bad)
    drawn = s.sample(x, torch.tensor([0, 1])).token_ids  # a valid tensor still works
    assert drawn.shape == (2,)
    never = next(t for t in range(5, 50) if t != int(drawn[0]))  # neither prompt nor output
    with pytest.raises(ValueError, match="outside"):
        s.rollback([0], torch.tensor([[60]]))
    with pytest.raises(ValueError, match="B=1"):
        s.rollback([0], torch.tensor([[5], [6]]))
    with pytest.raises(ValueError, match="at most 64"):
        s.rollback([0], torch.full((1, 65), 5))
    if backend == "torch":  # (the count check reads the tables: CPU samplers only)
        with pytest.raises(ValueError, match="never accepted"):
            s.rollback([0], torch.tensor([[never]]))
        s.accept([0], torch.tensor([[never]]))
        s.rollback([0], torch.tensor([[never]]))  # accepted, then rolled back: fine


def test_15_a_second_generator_does_not_convert_the_callers_model():
    from _models import tiny_model

    from decodekit import TokenGenerator
    model = tiny_model("llama")
    first = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64)
    TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.float32
    c = first.new_context([1, 5, 6], SamplingParams(temperature=0, max_new_tokens=4))
    first.next_token({c.request_id: c}, num_steps=4)
    assert len(c.generated_token_ids) == 4


def test_16_a_context_of_another_generator_is_refused():
    small, big = _gen(max_seq_len=32), _gen(max_seq_len=512)
    c = big.new_context(list(range(3, 303)), SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="another"):
        small.next_token({c.request_id: c})
    assert not small.running and c.slot is None


@pytest.mark.parametrize("prompt", [[3.7], [True, 5], b"abc", torch.ones(2, 3, dtype=torch.long),
                                    {"role": "user"}])
def test_18_prompts_are_never_coerced(prompt):
    with pytest.raises(ValueError, match="prompt"):
        _gen().new_context(prompt, SamplingParams(max_new_tokens=2))


def test_18_other_inputs_get_clear_errors():
    import numpy as np

    import decodekit
    gen = _gen()
    c = gen.new_context(np.array([1, 5, 6]), SamplingParams(max_new_tokens=2))  # a 1-D array is ids
    assert c.prompt_token_ids == [1, 5, 6]
    with pytest.raises(TypeError, match="mapping"):
        gen.next_token([c])
    with pytest.raises(ValueError, match="vocab_size"):
        Sampler(True, 2)
    with pytest.raises(ValueError, match="seed"):
        Sampler(10, 2, seed="x")
    with pytest.raises(ValueError, match="B >= 1"):
        decodekit.sample(torch.zeros(0, 10), SamplingParams())
    assert _gen(dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        _gen(dtype="float8")
    with pytest.raises(ValueError, match="device"):
        _gen(device="foo")


def test_19_learned_positions_limit_max_seq_len():
    from transformers import AutoConfig, AutoModelForCausalLM

    from decodekit import TokenGenerator
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=48, vocab_size=320,
                               bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(ValueError, match="48 learned positions"):
        TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=64)
    gen = TokenGenerator(model, word_tokenizer(), max_batch_size=1, max_seq_len=48)
    c = gen.new_context([1, 5, 6], SamplingParams(temperature=0, max_new_tokens=45, ignore_eos=True))
    while not c.is_done:
        gen.next_token({c.request_id: c}, num_steps=8)
    assert len(c.generated_token_ids) == 45


# ------------------------------------------------------------------------------------ files
def test_10_non_finite_steering_is_refused(tmp_path):
    from safetensors.torch import save_file

    from decodekit import Steering, SteeringVector
    good = SteeringVector({1: torch.ones(64)})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            SteeringVector({1: torch.full((64,), bad)})
    with pytest.raises(ValueError, match="strength"):
        Steering(good, strength=1e300)
    with pytest.raises(ValueError, match="overflows"):
        Steering(SteeringVector({1: torch.full((64,), 1e30)}), strength=1e10)
    with pytest.raises(ValueError, match="divisor"):
        good / float("nan")
    with pytest.raises(ValueError, match="scale"):
        good * float("inf")
    with pytest.raises(ValueError, match="strength"):
        Steering(good, strength=10**400)
    path = tmp_path / "nan.safetensors"
    save_file({"layer.1": torch.full((64,), float("nan"))}, str(path))
    with pytest.raises(ValueError, match="finite"):
        SteeringVector.load(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".gguf"])
def test_11_corrupt_steering_files_are_value_errors(tmp_path, suffix):
    import random

    from decodekit import SteeringVector
    path = tmp_path / f"v{suffix}"
    SteeringVector({i: torch.randn(64) for i in range(1, 4)}, model_name="m").save(path)
    data = path.read_bytes()
    rng = random.Random(11)
    cases = [data[:n] for n in (0, 8, len(data) // 2, len(data) - 1)]
    for _ in range(40):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cases.append(bytes(b))
    for blob in cases:
        path.write_bytes(blob)
        try:
            SteeringVector.load(path)
        except ValueError:
            pass  # refused, naming the problem; a flip in tensor data may also load fine


def test_12_load_errors_are_value_errors(tmp_path):
    from decodekit import load
    from decodekit.loading import embedded_gguf_path
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(embedded_gguf_path().read_bytes()[:4096])
    with pytest.raises(ValueError, match="t.gguf"):
        load(truncated)
    empty = tmp_path / "folder"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="folder"):
        load(empty)
    with pytest.raises(ValueError, match="device"):
        load(device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(device="cuda")
    with pytest.raises(ValueError, match="dtype"):
        load(dtype="float8")
    upper = tmp_path / "MODEL.GGUF"
    upper.symlink_to(embedded_gguf_path())
    model, tok = load(upper)  # (the converted cache is shared: a fast load)
    assert model.config.vocab_size == len(tok) or model.config.vocab_size > 0


def test_14_cache_writes_leave_no_temporaries(tmp_path):
    from decodekit.loading import atomic_store
    target = tmp_path / "entry"
    stale = tmp_path / "entry.tmp999999999-dead"  # a process that died mid-write
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)

    def write(folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    atomic_store(target, write)
    assert (target / "config.json").is_file()
    atomic_store(target, write)  # a racing process that finished second: its copy is dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]

    def failing(folder):
        folder.mkdir()
        raise OSError("disk full")

    atomic_store(tmp_path / "other", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


CLI_ABUSE = [
    ["generate", "hi", "--seed", "99999999999999999999"],
    ["generate", "hi", "--device", "foo"],
    ["generate", "hi", "--draft", "layerskip:0-99999999999", "--max-new-tokens", "2"],
    ["demo", "--vocab-size", "100000000"],
    ["demo", "--device", "foo"],
    ["demo", "--backend", "triton", "--steps", "1", "--draws", "100"],
]


@pytest.mark.parametrize("argv", CLI_ABUSE, ids=[" ".join(a[:3]) for a in CLI_ABUSE])
def test_13_cli_abuse_is_one_error_line(argv, capsys):
    from decodekit.cli import main
    if argv[:3] == ["demo", "--backend", "triton"] and torch.cuda.is_available():
        pytest.skip("a GPU is present: --backend triton is valid")
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: usage + one error line
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "error" in err, err


@pytest.mark.parametrize("kind", ["truncated gguf", "weightless folder", "corrupt steer", "unwritable -o"])
def test_13_cli_bad_files_are_one_error_line(kind, tmp_path, capsys):
    from decodekit.cli import main
    from decodekit.loading import embedded_gguf_path
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(embedded_gguf_path().read_bytes()[:2048])
    folder = tmp_path / "m"
    folder.mkdir()
    corrupt = tmp_path / "v.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"positive": "yes", "negative": "no"}\n')
    argv = {"truncated gguf": ["generate", "hi", "--model", str(bad)],
            "weightless folder": ["generate", "hi", "--model", str(folder)],
            "corrupt steer": ["generate", "hi", "--steer", str(corrupt), "--max-new-tokens", "2"],
            "unwritable -o": ["steer", "train", "--pairs", str(pairs), "--layers", "1",
                              "-o", "/nonexistent/dir/v.safetensors"]}[kind]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error" in err, err


def test_18_llm_generate_refuses_a_bare_message_dict():
    from _models import tiny_model

    from decodekit import LLM
    llm = LLM(model=tiny_model("llama"), tokenizer=word_tokenizer(), max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="list of messages"):
        llm.generate({"role": "user", "content": "hi"})
