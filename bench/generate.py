"""Token-generator benchmark: decodekit's :class:`~decodekit.generator.TokenGenerator`
against transformers' ``model.generate`` on the same model, prompts and settings.

For every (model, setting, batch B) both sides generate exactly ``N = max_new_tokens``
tokens for each of the first ``B`` prompts of :data:`PROMPTS` (chat prompts rendered
with the chat template into token ids once; both sides get the same ids):

* decodekit: one :class:`TokenGenerator` per (model, B) with ``max_batch_size=B``;
  every request has ``max_new_tokens=N, ignore_eos=True``. The scheduler loop calls
  ``next_token(batch, num_steps=1)`` until every request is done (one token per request
  per call, as a streaming server would). The first call prefills the requests (one
  forward each) and samples their first token: its wall time is **prefill**. Every later
  call is one decode step; **decode time** is the sum of their wall times.
* transformers: ``model.generate`` on the left-padded batch with an attention mask and a
  fresh ``GenerationConfig(max_new_tokens=N, min_new_tokens=N, eos_token_id=None)``
  (``do_sample``, ``temperature``, ``top_p`` as the setting says, ``top_k=0`` so HF's
  default top-k of 50 is off as on our side). ``generate(max_new_tokens=1)`` (prefill +
  first token + generate's own set-up) estimates **prefill**; **decode time** is
  ``median(T_N) - median(T_1)``. (generate refills ``eos_token_id`` from the model's
  generation config, so its MinLength / MinNewTokensLength processors mask EOS each step.)

**Decode tokens/s** = ``B * (N - 1) / decode time`` on both sides (the first token of each
request belongs to prefill). **Ratio** = decodekit tok/s / HF tok/s (> 1: decodekit faster).
A second, spike-robust ratio compares **median step** times: decodekit's median
``next_token`` decode call against HF's median interval between consecutive calls of a no-op
``StoppingCriteria`` that stamps ``time.perf_counter()`` once per generated token (pooled
over all repeats; on CUDA these are host stamps, taken after generate's per-step checks).

**Host overhead per step**: the measured time of one decode step minus the time of the
model forward alone, measured in the same run. "Model forward alone" (``fwd ms``) is one
eager ``model(...)`` call at batch B, one query token per row, through decodekit's own slot
KV cache at the KV length(s) decodekit's decode steps used (weighted by how many steps used
each; decodekit pads the KV length to a multiple of 64), with input ids, positions, the 4D
mask and the cache binding all prepared outside the timed region, timed right after every
decodekit repeat (so in the same load conditions) and reduced to a median. It is the floor
any eager runtime pays per step. decodekit's overhead is ``step - fwd`` where ``step`` is the
mean wall time of a ``next_token`` decode call (the tables also give it with the median call);
it contains building the step's input tensors and
masks, ``SlotKVCache.bind``, the sampler, EOS tracking / detokenisation and Python glue. HF's
overhead is ``(decode time / (N - 1)) - fwd``: its DynamicCache growth (``torch.cat``), mask
creation inside the model, logits processors, stopping criteria and generate's loop. On CPU
"host overhead" is simply everything outside the model forward (the sampler runs on the host
too). The decodekit step is also split with ``gen.stats`` (``forward_s``: inputs + masks +
bind + model call; ``sample_s``: sampler + row gather + ``.tolist()``; the rest: EOS /
detokenisation / glue).

Timings are medians over ``--repeats`` repetitions (sides interleaved) after one short
warm-up run per side; CPU runs use ``--threads`` torch threads (default 2). ``--profile``
also runs cProfile over batch-1 decode steps and attributes the step time to model forward,
mask building, sampler, EOS/detokenisation and glue.

Models: on CPU the embedded SmolLM2-135M-Instruct (fp32), B in {1, 8}, N=32 (B=32 with
``--batch``). On CUDA the same (bf16) plus a randomly initialised model shaped like
Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocabulary
128256, tied embeddings) in bf16, B in {1, 8, 32}, N=128; its prompts are the SmolLM2
chat-rendered ids and a word-level tokenizer over its vocabulary detokenises. ``--smoke``: a
tiny random llama with a word-level tokenizer, B in {1, 2}, N=4 (tests the harness only).

Results: ``<out>/generate-<device-slug>.json`` and ``.md`` (``-smoke`` appended for
``--smoke``, then ``-<tag>`` for ``--tag``).

Usage::

    python -m bench.generate [--quick] [--batch 1 8 32] [--max-new-tokens N]
                             [--settings greedy sampled] [--models smollm2 llama1b-random]
                             [--repeats R] [--threads N] [--device cuda|cpu] [--out DIR]
                             [--profile] [--smoke] [--tag TAG]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._util import (
    DTYPES,
    Timing,
    bench_ms,
    device_name,
    fmt_ratio,
    fmt_us,
    load_average,
    markdown_table,
    metadata,
    pick_device,
    random_llama,
    result_stem,
    synchronize,
    word_tokenizer,
    write_results,
)

#: Chat prompts (one user turn each), rendered with the model's chat template.
PROMPTS: list[str] = [
    "Write a haiku about the sea.",
    "Explain the difference between a process and a thread in two short paragraphs.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "Translate into French: 'The train leaves at seven tomorrow morning.'",
    "Give me five ideas for a rainy Sunday afternoon with children.",
    "How does a refrigerator keep food cold?",
    "Solve for x: 3x + 7 = 22. Show your steps.",
    "Write a short, polite email asking a colleague to review my pull request.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "List three pros and three cons of working from home.",
    "Write a limerick about a cat who learns to code.",
    "What is the difference between TCP and UDP?",
    "Suggest a name for a bakery that specialises in sourdough bread.",
    "Explain recursion with a simple example.",
    "Why is the sky blue? Keep it brief.",
    "Write a SQL query that returns the ten most recent orders from an 'orders' table.",
    "What should I pack for a three-day hiking trip in the mountains?",
    "Give a one-paragraph biography of Marie Curie.",
    "How do vaccines train the immune system?",
    "Rewrite this sentence to sound more formal: 'gonna be late, traffic is crazy'.",
    "What is a hash table and when would you use one?",
    "Write the opening line of a mystery novel set in Venice.",
    "Compare electric cars and petrol cars in terms of running costs.",
    "Explain what a neural network is without using any maths.",
    "Give me a simple recipe for tomato soup.",
    "What is the Pythagorean theorem? Give an example with numbers.",
    "Write a motivational message for someone starting a new job.",
    "How can I improve my sleep? Give practical tips.",
    "Explain the rules of chess for the knight and the bishop.",
]

#: Shape of Llama-3.2-1B (randomly initialised; only the cost matters).
LLAMA_1B_CONFIG: dict[str, Any] = dict(
    hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
    max_position_embeddings=8192,
)
#: The ``--smoke`` model: a tiny llama (tests/_models.py's ``tiny_config("llama")``).
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=320, max_position_embeddings=512,
)
MODEL_NAMES = ("smollm2", "llama1b-random")


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One decoding setting: decodekit's SamplingParams fields and HF's GenerationConfig ones."""

    name: str
    description: str
    dk: dict[str, Any]
    hf: dict[str, Any]


SETTINGS: dict[str, Setting] = {
    "greedy": Setting("greedy", "temperature 0 (argmax)", {"temperature": 0.0},
                      {"do_sample": False}),
    "sampled": Setting("sampled", "top_p 0.9, temperature 0.8 (no top-k)",
                       {"temperature": 0.8, "top_p": 0.9},
                       {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}),
}


@dataclass
class Workload:
    """A model with its prompts (token ids) and the sizes to run."""

    name: str
    description: str
    model: Any
    tokenizer: Any  # decodekit's detokeniser
    prompts: list[list[int]]
    pad_id: int
    dtype_name: str
    batches: list[int]
    max_new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


def chat_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one user turn through the chat template (with the generation prompt)."""
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        out.append([int(t) for t in ids])
    return out


def smoke_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of 5..20 random ids in ``[3, vocab)`` (deterministic)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (5 + (7 * i) % 16,), generator=gen).tolist()
            for i in range(n)]


# --------------------------------------------------------------------------- decodekit side
@dataclass
class DkRun:
    prefill_s: float
    step_s: list[float]
    forward_s: list[float]  # gen.stats per decode call
    sample_s: list[float]
    total_s: list[float]
    kv_lens: list[int]
    tokens: list[list[int]]

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


def dk_params(setting: Setting, n: int, i: int) -> Any:
    from decodekit.params import SamplingParams

    return SamplingParams(max_new_tokens=n, ignore_eos=True, seed=1000 + i, **setting.dk)


def run_decodekit(gen: Any, prompts: list[list[int]], setting: Setting, n: int,
                  device: torch.device) -> DkRun:
    """One generation of ``n`` tokens for every prompt, one ``next_token`` call per step."""
    ctxs = {f"r{i}": gen.new_context(p, dk_params(setting, n, i), request_id=f"r{i}")
            for i, p in enumerate(prompts)}
    try:
        synchronize(device)
        t0 = time.perf_counter()
        gen.next_token(ctxs, 1)
        synchronize(device)
        run = DkRun(time.perf_counter() - t0, [], [], [], [], [], [])
        while not all(c.is_done for c in ctxs.values()):
            t0 = time.perf_counter()
            gen.next_token(ctxs, 1)
            synchronize(device)
            run.step_s.append(time.perf_counter() - t0)
            st = gen.stats
            run.forward_s.append(st.forward_s)
            run.sample_s.append(st.sample_s)
            run.total_s.append(st.total_s)
            run.kv_lens.append(int(gen.cache.kv_len))
            if len(run.step_s) > 4 * n:
                raise RuntimeError(f"requests not done after {len(run.step_s)} steps")
        run.tokens = [list(c.generated_token_ids) for c in ctxs.values()]
    finally:
        for c in ctxs.values():
            gen.release(c)
    bad = [len(t) for t in run.tokens if len(t) != n]
    if bad:
        raise RuntimeError(f"decodekit generated {bad} tokens instead of {n}")
    return run


# --------------------------------------------------------------------------- HF side
def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` [B, longest]."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def _step_clock(stamps: list[float]) -> Any:
    """A StoppingCriteria that never stops and records ``time.perf_counter()`` each time
    ``generate`` calls it (once per generated token, after the token is chosen)."""
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


@dataclass
class HfRun:
    total_s: float
    step_s: list[float]  # between consecutive StepClock calls: one decode step each
    tokens: torch.Tensor


def run_hf(model: Any, ids: torch.Tensor, mask: torch.Tensor, setting: Setting, n: int,
           pad_id: int, device: torch.device) -> HfRun:
    """Wall time of ``model.generate`` producing exactly ``n`` tokens per row, and them."""
    from transformers import GenerationConfig, StoppingCriteriaList

    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=pad_id, **setting.hf)
    stamps: list[float] = []
    synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                         stopping_criteria=StoppingCriteriaList([_step_clock(stamps)]))
    synchronize(device)
    dt = time.perf_counter() - t0
    new = out[:, ids.shape[1]:]
    if new.shape[1] != n:
        raise RuntimeError(f"model.generate produced {new.shape[1]} tokens instead of {n}")
    if len(stamps) != n:
        raise RuntimeError(f"the step clock ran {len(stamps)} times for {n} tokens")
    return HfRun(dt, [stamps[i + 1] - stamps[i] for i in range(n - 1)], new.cpu())


# --------------------------------------------------------------------------- model forward
def forward_timer(gen: Any, batch: int, kv_len: int, device: torch.device, timing: Timing
                  ) -> Callable[[], float]:
    """A function that times (ms, :func:`bench_ms` after one warm-up call) one eager forward
    at ``batch`` x 1 token over ``kv_len`` KV positions through the generator's slot cache,
    with input ids, positions, the mask and the cache binding prepared outside the timed call.
    Its writes land at position ``kv_len - 1`` of slots ``0..batch-1``, masked and later
    overwritten, so it must only run between generations."""
    from decodekit.hf_compat import cache_kwarg
    from decodekit.kv_cache import SlotKVCache, mask_layout

    q = torch.full((batch, 1), kv_len - 1, dtype=torch.long, device=device)
    length = torch.full((batch,), kv_len, dtype=torch.long, device=device)
    kind, windows = mask_layout(gen.model)
    masks = {k: SlotKVCache.attention_mask(q, length, kv_len, w, gen.dtype)
             for k, w in windows.items()}
    attn = masks if kind == "mapping" else masks["all"]
    x = torch.full((batch, 1), 5, dtype=torch.long, device=device)
    model, cache = gen.model, gen.cache

    def fn() -> Any:
        return model(input_ids=x, attention_mask=attn, position_ids=q, use_cache=True, logits_to_keep=1,
                     **{cache_kwarg(model): cache})

    @torch.inference_mode()
    def measure() -> float:
        cache.bind(0, q, kv_len)
        fn()
        synchronize(device)
        return bench_ms(fn, device, timing)

    return measure


# --------------------------------------------------------------------------- profile
PROFILE_PARTS = {
    # category -> (file suffix, function name) whose cumulative time it is
    "next_token": ("decodekit/generator.py", "next_token"),
    "forward_section": ("decodekit/generator.py", "_forward"),
    "masks": ("decodekit/generator.py", "_masks"),
    "cache_bind": ("decodekit/kv_cache.py", "bind"),
    "cache_update": ("decodekit/kv_cache.py", "update"),
    "sampler": ("decodekit/sampling/sampler.py", "sample"),
    "eos_detok": ("decodekit/eos.py", "commit"),
}


def _cum(stats: pstats.Stats, suffix: str, name: str) -> float:
    total = 0.0
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and fname.replace(os.sep, "/").endswith(suffix):
            total += ct
    return total


def profile_decode(gen: Any, prompt: list[int], setting: Setting, steps: int,
                   device: torch.device, top: int = 15) -> dict[str, Any]:
    """cProfile ``steps`` batch-1 decode calls; per-step attribution in microseconds.

    ``model`` = forward section - masks - bind (the model call, KV writes included);
    ``inputs_glue`` = next_token - forward section - sampler - EOS/detok (input tensors,
    slot bookkeeping, response objects). cProfile inflates Python-heavy parts.
    """
    ctx = gen.new_context(prompt, dk_params(setting, steps + 1, 0), request_id="profile")
    batch = {"profile": ctx}
    try:
        gen.next_token(batch, 1)  # prefill
        gen.next_token(batch, 1)  # one unprofiled decode step
        prof = cProfile.Profile()
        n = 0
        t0 = time.perf_counter()
        prof.enable()
        while not ctx.is_done:
            gen.next_token(batch, 1)
            n += 1
        prof.disable()
        wall = time.perf_counter() - t0
    finally:
        gen.release(ctx)
    st = pstats.Stats(prof)
    cum = {k: _cum(st, *v) / n * 1e6 for k, v in PROFILE_PARTS.items()}
    parts = {
        "model_forward": cum["forward_section"] - cum["masks"] - cum["cache_bind"],
        "masks": cum["masks"],
        "cache_bind": cum["cache_bind"],
        "sampler": cum["sampler"],
        "eos_detok": cum["eos_detok"],
        "inputs_glue": cum["next_token"] - cum["forward_section"] - cum["sampler"]
        - cum["eos_detok"],
    }
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    top_fns = [{"function": f"{os.path.basename(f)}:{line}({func})", "calls_per_step": nc / n,
                "tottime_us_per_step": tt / n * 1e6, "cumtime_us_per_step": ct / n * 1e6}
               for (f, line, func), (_cc, nc, tt, ct, _c) in rows[:top]]
    return {"setting": setting.name, "steps": n, "wall_us_per_step": wall / n * 1e6,
            "next_token_us_per_step": cum["next_token"], "parts_us_per_step": parts,
            "cache_update_us_per_step": cum["cache_update"], "top_tottime": top_fns}


# --------------------------------------------------------------------------- running
@dataclass
class Config:
    device: torch.device
    models: list[str]
    settings: list[str]
    batches: list[int] | None
    max_new_tokens: int | None
    repeats: int
    warmup_tokens: int
    fwd_timing: Timing
    smoke: bool
    profile: bool
    profile_steps: int
    dtype: str | None
    out: str


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def build_workloads(cfg: Config) -> list[Workload]:
    """The models to run (see the module docstring)."""
    dev, cuda = cfg.device, cfg.device.type == "cuda"
    if cfg.smoke:
        dtype_name = cfg.dtype or "fp32"
        model = random_llama(DTYPES[dtype_name], dev, **TINY_CONFIG)
        return [Workload("tiny-llama-random", "tiny random llama (2 layers, hidden 64, V=320)",
                         model, word_tokenizer(TINY_CONFIG["vocab_size"]),
                         smoke_prompts(len(PROMPTS), TINY_CONFIG["vocab_size"]), 0, dtype_name,
                         cfg.batches or [1, 2], cfg.max_new_tokens or 4)]
    from decodekit.loading import DEFAULT_MODEL, load

    out: list[Workload] = []
    dtype_name = cfg.dtype or ("bf16" if cuda else "fp32")
    small, tok = load(device=dev, dtype=DTYPES[dtype_name])
    prompts = chat_ids(tok, PROMPTS)
    n_default = 128 if cuda else 32
    if "smollm2" in cfg.models:
        out.append(Workload("smollm2-135m", f"{DEFAULT_MODEL} (embedded)", small, tok, prompts,
                            int(tok.pad_token_id), dtype_name,
                            cfg.batches or ([1, 8, 32] if cuda else [1, 8]),
                            cfg.max_new_tokens or n_default))
    else:
        del small
    if "llama1b-random" in cfg.models:
        big_dtype = cfg.dtype or "bf16"
        model = random_llama(DTYPES[big_dtype], dev, **LLAMA_1B_CONFIG)
        out.append(Workload("llama1b-random", "random init, Llama-3.2-1B shape", model,
                            word_tokenizer(LLAMA_1B_CONFIG["vocab_size"]), prompts, 0, big_dtype,
                            cfg.batches or [1, 8, 32], cfg.max_new_tokens or n_default,
                            extra={"config": LLAMA_1B_CONFIG}))
    return out


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_point(wl: Workload, gen: Any, setting: Setting, batch: int, cfg: Config
              ) -> dict[str, Any]:
    """Benchmark one (workload, setting, batch); returns the JSON row."""
    dev, n = cfg.device, wl.max_new_tokens
    prompts = [wl.prompts[i % len(wl.prompts)] for i in range(batch)]
    ids, mask = left_pad(prompts, wl.pad_id, dev)
    row: dict[str, Any] = {
        "model": wl.name, "dtype": wl.dtype_name, "setting": setting.name, "batch": batch,
        "max_new_tokens": n, "decode_tokens": batch * (n - 1),
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": sum(map(len, prompts)) / batch},
        "status": {}, "repeats": cfg.repeats,
    }
    dk_runs: list[DkRun] = []
    hf_n: list[HfRun] = []
    hf_1: list[float] = []
    ok = {"decodekit": True, "hf": True, "forward": True}
    timers: dict[int, Callable[[], float]] = {}
    fwd_samples: dict[int, list[float]] = {}
    load_start = load_average()

    def attempt(side: str, fn: Callable[[], Any]) -> Any:
        if not ok[side]:
            return None
        try:
            return fn()
        except Exception as exc:
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            ok[side] = False
            row["status"][side] = f"error: {_short(exc)}"
            return None

    w = min(cfg.warmup_tokens, n)
    attempt("decodekit", lambda: run_decodekit(gen, prompts, setting, w, dev))
    attempt("hf", lambda: run_hf(wl.model, ids, mask, setting, w, wl.pad_id, dev))
    for _ in range(cfg.repeats):
        r = attempt("decodekit", lambda: run_decodekit(gen, prompts, setting, n, dev))
        if r is not None:
            dk_runs.append(r)
            # the model forward alone, in the same time window as the steps it is compared with
            for k in sorted(set(r.kv_lens)):
                if k not in timers:
                    timers[k] = forward_timer(gen, batch, k, dev, cfg.fwd_timing)
                ms = attempt("forward", timers[k])
                if ms is not None:
                    fwd_samples.setdefault(k, []).append(ms)
        r = attempt("hf", lambda: run_hf(wl.model, ids, mask, setting, n, wl.pad_id, dev))
        if r is not None:
            hf_n.append(r)
        r = attempt("hf", lambda: run_hf(wl.model, ids, mask, setting, 1, wl.pad_id, dev))
        if r is not None:
            hf_1.append(r.total_s)
    for side in ok:
        row["status"].setdefault(side, "ok")

    steps = n - 1
    dk: dict[str, Any] | None = None
    if ok["decodekit"] and dk_runs:
        decode_s = _median([r.decode_s for r in dk_runs])
        step_s = _median([r.decode_s / len(r.step_s) for r in dk_runs])

        def per_step(attr: str) -> float:
            return _median([sum(getattr(r, attr)) / len(r.step_s) for r in dk_runs]) * 1e3

        dk = {
            "prefill_ms": _median([r.prefill_s for r in dk_runs]) * 1e3,
            "decode_s": decode_s,
            "tok_s": batch * steps / decode_s,
            "step_ms": step_s * 1e3,
            "stats_forward_ms": per_step("forward_s"),
            "stats_sample_ms": per_step("sample_s"),
            "stats_total_ms": per_step("total_s"),
            "step_ms_median": _median([t for r in dk_runs for t in r.step_s]) * 1e3,
            "decode_s_all": [r.decode_s for r in dk_runs],
            "prefill_ms_all": [r.prefill_s * 1e3 for r in dk_runs],
        }
        dk["stats_other_ms"] = dk["stats_total_ms"] - dk["stats_forward_ms"] \
            - dk["stats_sample_ms"]
        dk["call_outside_stats_ms"] = dk["step_ms"] - dk["stats_total_ms"]
        kv = Counter(dk_runs[-1].kv_lens)
        row["kv_lens"] = {str(k): c for k, c in sorted(kv.items())}
    hf: dict[str, Any] | None = None
    if ok["hf"] and hf_n and hf_1:
        t_n, t_1 = _median([r.total_s for r in hf_n]), _median(hf_1)
        decode_s = t_n - t_1
        hf = {
            "prefill_ms": t_1 * 1e3,
            "generate_ms": t_n * 1e3,
            "decode_s": decode_s,
            "tok_s": batch * steps / decode_s if decode_s > 0 else None,
            "step_ms": decode_s / steps * 1e3,
            "step_ms_median": _median([t for r in hf_n for t in r.step_s]) * 1e3,
            "generate_ms_all": [r.total_s * 1e3 for r in hf_n],
            "prefill_ms_all": [t * 1e3 for t in hf_1],
        }
    row["decodekit"], row["hf"] = dk, hf
    row["ratio"] = (dk["tok_s"] / hf["tok_s"]) if (dk and hf and hf["tok_s"]) else None
    row["ratio_median_step"] = (hf["step_ms_median"] / dk["step_ms_median"]) if (dk and hf) \
        else None

    # the model forward alone at the KV lengths decodekit's decode steps used, weighted
    fwd = None
    if dk is not None and ok["forward"] and fwd_samples:
        kv = Counter(dk_runs[-1].kv_lens)
        times = {k: _median(fwd_samples[k]) for k in kv}
        fwd = sum(times[k] * c for k, c in kv.items()) / sum(kv.values())
        row["forward_ms_by_kv_len"] = {str(k): v for k, v in sorted(times.items())}
        row["forward_ms_samples"] = {str(k): v for k, v in sorted(fwd_samples.items())}
    row["forward_ms"] = fwd
    row["load_avg_1m"] = {"start": load_start, "end": load_average()}
    row["overhead_us"] = {
        "decodekit": None if (fwd is None or dk is None) else (dk["step_ms"] - fwd) * 1e3,
        "hf": None if (fwd is None or hf is None) else (hf["step_ms"] - fwd) * 1e3,
    }
    row["overhead_us_median_step"] = {
        "decodekit": None if (fwd is None or dk is None) else (dk["step_ms_median"] - fwd) * 1e3,
        "hf": None if (fwd is None or hf is None) else (hf["step_ms_median"] - fwd) * 1e3,
    }
    if setting.name == "greedy" and dk_runs and hf_n:
        same = [dk_runs[-1].tokens[i] == hf_n[-1].tokens[i].tolist() for i in range(batch)]
        row["greedy_rows_identical"] = sum(same) / batch
    return row


def format_row_line(row: dict[str, Any]) -> str:
    dk, hf, ov = row["decodekit"], row["hf"], row["overhead_us"]
    head = f"{row['model']:<18} {row['setting']:<7} B={row['batch']:<3} N={row['max_new_tokens']}"
    if dk is None or hf is None:
        return f"{head} | {row['status']}"
    return (f"{head} | decodekit {dk['tok_s']:8.1f} tok/s (prefill {dk['prefill_ms']:.0f} ms, "
            f"step {dk['step_ms']:.2f} ms) | HF {hf['tok_s'] or 0:8.1f} tok/s (prefill "
            f"{hf['prefill_ms']:.0f} ms, step {hf['step_ms']:.2f} ms) | ratio "
            f"{fmt_ratio(row['ratio'])} (median step {fmt_ratio(row['ratio_median_step'])}) | "
            f"fwd {_ms(row['forward_ms'])} ms | overhead/step "
            f"dk {fmt_us(_div(ov['decodekit']))} us, HF {fmt_us(_div(ov['hf']))} us")


def _div(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pair(side: dict[str, Any] | None, a: str, b: str) -> str:
    return "-" if side is None else f"{side[a]:.2f} / {side[b]:.2f}"


def _tok_s(side: dict[str, Any] | None) -> str:
    if side is None:
        return "error"
    return "n/a" if side["tok_s"] is None else f"{side['tok_s']:,.1f}"


def render_markdown(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"# Token generator benchmark: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- timestamp: {meta['timestamp']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, triton "
        f"{meta['triton']}, python {meta['python']}",
        f"- torch threads: {meta['cpu_threads']} ({meta['cpu_count']} cores); 1-minute load "
        f"average {meta['load_avg_1m']} at the start, {meta['load_avg_1m_end']} at the end",
        "- models: " + "; ".join(f"{k}: {v}" for k, v in meta["models"].items()),
        "- settings: " + "; ".join(f"{k}: {v}" for k, v in meta["settings"].items()),
        f"- {meta['repeats']} repeat(s) per point, medians; sides interleaved; one warm-up run "
        f"of {meta['warmup_tokens']} tokens per side and point",
        "- decode tok/s = B * (N - 1) / decode time. decodekit: decode time = sum of the "
        "`next_token(num_steps=1)` calls after the first (prefill) one. HF: decode time = "
        "median generate(max_new_tokens=N) - median generate(max_new_tokens=1)",
        "- ratio = decodekit tok/s / HF tok/s (> 1: decodekit faster). ratio (median step) = "
        "HF median step / decodekit median step over all decode steps of all repeats (HF steps "
        "timed by a no-op StoppingCriteria that stamps each token): robust to load spikes",
        "- fwd = one eager model forward alone (B x 1 token, decodekit's slot cache at the KV "
        "lengths its decode steps used, all inputs prepared outside the timed call; timed after "
        "every decodekit repeat, median); "
        "overhead/step = decode step time - fwd, with the mean step (decode time / (N - 1)) "
        "and with the median step",
        "- dk split (per decode step, from `gen.stats`): fwd section = input tensors + masks + "
        "cache bind + model call; sampler = row gather + Sampler.sample + .tolist(); other = "
        "EOS tracking / detokenisation / glue inside next_token",
        "",
    ]
    table = []
    split = []
    for r in rows:
        dk, hf = r["decodekit"], r["hf"]
        ov, ovm = r["overhead_us"], r["overhead_us_median_step"]
        table.append([
            r["model"], r["dtype"], r["setting"], r["batch"], r["max_new_tokens"],
            _ms(dk and dk["prefill_ms"]), _ms(hf and hf["prefill_ms"]),
            _tok_s(dk), _tok_s(hf), fmt_ratio(r["ratio"]), _ms(r["forward_ms"]),
            _pair(dk, "step_ms", "step_ms_median"), _pair(hf, "step_ms", "step_ms_median"),
            fmt_ratio(r["ratio_median_step"]),
            f"{fmt_us(_div(ov['decodekit']))} / {fmt_us(_div(ovm['decodekit']))}",
            f"{fmt_us(_div(ov['hf']))} / {fmt_us(_div(ovm['hf']))}",
        ])
        if dk is not None:
            split.append([r["model"], r["setting"], r["batch"], _ms(dk["step_ms"]),
                          _ms(dk["stats_forward_ms"]), _ms(r["forward_ms"]),
                          fmt_us(dk["stats_sample_ms"]), fmt_us(dk["stats_other_ms"]),
                          fmt_us(dk["call_outside_stats_ms"])])
    lines.append(markdown_table(
        ["model", "dtype", "setting", "B", "N", "dk prefill ms", "HF prefill ms",
         "decodekit tok/s", "HF tok/s", "ratio", "fwd ms", "dk step ms mean / median",
         "HF step ms mean / median", "ratio (median step)",
         "dk overhead us/step mean / median", "HF overhead us/step mean / median"], table))
    lines += ["", "decodekit step split (per decode step):", ""]
    lines.append(markdown_table(
        ["model", "setting", "B", "step ms", "fwd section ms", "fwd alone ms", "sampler us",
         "other us", "outside stats us"], split))
    errors = [f"- {r['model']} {r['setting']} B={r['batch']}: {k}: {v}"
              for r in rows for k, v in r["status"].items() if v != "ok"]
    if errors:
        lines += ["", "Errors:", "", *errors, ""]
    for p in meta.get("profiles", []):
        parts = p["parts_us_per_step"]
        lines += ["", f"cProfile of {p['steps']} batch-1 decode steps ({p['model']}, "
                  f"{p['setting']}; wall {p['wall_us_per_step']:,.0f} us/step under the "
                  "profiler):", ""]
        lines.append(markdown_table(["part", "us/step"],
                                    [[k, f"{v:,.0f}"] for k, v in parts.items()]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.generate",
        description="Decode tokens/s of decodekit's TokenGenerator vs transformers' "
                    "model.generate, with the per-step host overhead.",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (2); on CUDA also max_new_tokens 64")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random llama + word tokenizer, B 1 and 2, 4 new tokens")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per request")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), help="decoding settings")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES,
                   help="models (default: smollm2 on CPU, both on CUDA)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--repeats", type=int, help="timed repetitions per point (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 2 on CPU (1 with --smoke), torch's "
                        "choice on CUDA; 0: torch's own choice")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile batch-1 decode steps of the first model")
    p.add_argument("--out", default="bench/results", help="directory for the JSON/markdown files")
    p.add_argument("--tag", default=None,
                   help="suffix of the result files: generate-<device-slug>-<tag>.{json,md}")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    models = args.models or (list(MODEL_NAMES) if cuda else ["smollm2"])
    n = args.max_new_tokens
    if n is None and args.quick and cuda and not args.smoke:
        n = 64
    if n is not None and n < 2:
        raise SystemExit("--max-new-tokens must be >= 2 (the first token is prefill)")
    repeats = args.repeats or (2 if args.quick else 3)
    fwd_timing = (Timing(warmup_ms=10, rep_ms=50) if cuda
                  else Timing(warmup=0, repeats=1 if args.smoke else 3))
    return Config(
        device=dev, models=models, settings=args.settings or list(SETTINGS),
        batches=args.batch, max_new_tokens=n, repeats=repeats,
        warmup_tokens=2 if args.smoke else 4, fwd_timing=fwd_timing, smoke=bool(args.smoke),
        profile=bool(args.profile), profile_steps=4 if args.smoke else 32, dtype=args.dtype,
        out=args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    dev = cfg.device
    # --smoke: one thread (with two, a busy machine stalls OpenMP regions for whole time slices,
    # which swamps the few-millisecond timings of the tiny model)
    threads = args.threads if args.threads is not None else (
        0 if dev.type == "cuda" else (1 if args.smoke else 2))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    print(f"device: {device_name(dev)}, {torch.get_num_threads()} torch thread(s)")
    load = load_average()
    if dev.type != "cuda" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load} on {os.cpu_count()} cores; CPU timings "
              "will be noisy", file=sys.stderr)
    from decodekit.generator import TokenGenerator

    workloads = build_workloads(cfg)
    rows: list[dict[str, Any]] = []
    profiles: list[dict[str, Any]] = []
    failed = False
    for wl in workloads:
        for batch in wl.batches:
            longest = max(len(wl.prompts[i % len(wl.prompts)]) for i in range(batch))
            max_seq = -(-(longest + wl.max_new_tokens) // 64) * 64
            gen = TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch,
                                 max_seq_len=max_seq, seed=0)
            for name in cfg.settings:
                row = run_point(wl, gen, SETTINGS[name], batch, cfg)
                rows.append(row)
                print(format_row_line(row), flush=True)
                failed |= any(v.startswith("error") for v in row["status"].values())
            if cfg.profile and batch == 1 and wl is workloads[0]:
                for name in cfg.settings:
                    p = profile_decode(gen, wl.prompts[0], SETTINGS[name], cfg.profile_steps, dev)
                    p["model"] = wl.name
                    profiles.append(p)
                    print(f"profile {wl.name} {name} B=1: " + ", ".join(
                        f"{k} {v:,.0f} us" for k, v in p["parts_us_per_step"].items()),
                        flush=True)
            del gen
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    meta = metadata(
        dev,
        threads=torch.get_num_threads(),
        repeats=cfg.repeats,
        warmup_tokens=cfg.warmup_tokens,
        smoke=cfg.smoke,
        models={wl.name: f"{wl.description}, {wl.dtype_name}, B {wl.batches}, "
                f"N {wl.max_new_tokens}" for wl in workloads},
        settings={k: SETTINGS[k].description for k in cfg.settings},
        hf_generation_config={k: {**SETTINGS[k].hf, "min_new_tokens": "N",
                                  "max_new_tokens": "N", "eos_token_id": None}
                              for k in cfg.settings},
        n_prompts=len(PROMPTS),
        forward_timing=("after every decodekit repeat, per KV length: one warm-up call, then "
                        + (f"triton.testing.do_bench median (warmup {cfg.fwd_timing.warmup_ms} "
                           f"ms, rep {cfg.fwd_timing.rep_ms} ms)" if dev.type == "cuda" else
                           f"time.perf_counter median of {cfg.fwd_timing.repeats} calls")
                        + "; the median over repeats"),
        profiles=profiles,
    )
    meta["load_avg_1m_end"] = load_average()
    md = render_markdown(meta, rows)
    stem = result_stem("generate", dev, "smoke" if cfg.smoke else None, args.tag)
    json_path, md_path = write_results(cfg.out, stem, meta, rows, md)
    print()
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if failed:
        print("some runs failed (see status above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
