"""Steering benchmark: decode tokens/s of decodekit's :class:`~decodekit.TokenGenerator` with
per-request steering against the same generator without it.

Configurations, at every batch size B (every request generates exactly ``N`` tokens,
greedy, ``ignore_eos=True``, from the first ``B`` prompts of ``bench.generate.PROMPTS``):

* ``none`` (a): a generator built with ``steering=False``: no hooks at all (the baseline);
* ``idle-hooks`` (b): ``steering=True`` (the hooks on every decoder layer), no request steered:
  the cost of installed but idle hooks; its tokens must equal (a)'s token for token;
* ``one-layer`` (c): the middle decoder layer (``L // 2``) steered, the same vector for all
  requests;
* ``all-layers`` (d): every decoder layer steered, the same vector for all requests;
* ``all-layers-per-request`` (e): every decoder layer steered, a different vector per request;
* ``half-steered`` (f, B > 1 only): even requests steered as in (e), odd ones unsteered: the
  unsteered rows must equal (a)'s rows token for token (rows without steering are bit-identical
  in a steered batch).

All steering is ``op="add"``, ``strength=1``, ``positions="all"``. The vectors are random
directions scaled from the model's own hidden states: the median L2 norm of each decoder
layer's output over the prompts' tokens (the first, attention-sink, position left out), times
``--alpha`` (default 0.5), divided by ``sqrt(L)`` when all ``L`` layers are steered, so that
the injected sum (random directions are nearly orthogonal) has about the same norm, ``alpha``
times a typical hidden state, for one layer and for all layers: generation stays sane but does
change.

Every run builds a fresh generator (``max_batch_size=B``), checks the number of forward
hooks on the decoder layers (none for (a), one per layer otherwise), generates a short
warm-up, then times one generation: the first ``next_token(num_steps=1)`` call prefills
every request (its wall time is **prefill**), every later call is one decode step; **decode
tok/s** = ``B * (N - 1) / decode time`` (decode time = the sum of those later calls). The
generator is then dropped (its hooks with it: the steering hooks live as long as their
generator, so a hook-free baseline needs a generator of its own, and the model is shared).
The configurations are interleaved within each of ``--repeats`` repeats, in an order that
rotates from repeat to repeat, to cancel machine drift; tok/s is the median over repeats.

**Overhead** = ``1 - tok/s / baseline tok/s`` (percent slower than (a)), from the medians;
also the median of the per-repeat paired ratios (each run against the baseline run of the same
repeat) and from the median decode step over all steps of all repeats (robust to load spikes).
Targets (the issue): one steered layer at most 3% slower on GPU, 5% on CPU; all layers with
per-request vectors at most 10%.

On CUDA each configuration also runs in the generator's two step modes (``--modes``): with
CUDA graphs (the default generator: a batch with a steered request then runs eagerly, so
(c)-(f) compare an eager steered step against a graphed baseline) and eager
(``cuda_graphs=False`` for every configuration: the hooks' own cost).

Models: on CPU the embedded SmolLM2-135M-Instruct (fp32), B in {1, 32}, N=24; on CUDA a
randomly initialised model shaped like Llama-3.2-1B (``bench.generate.LLAMA_1B_CONFIG``) in
bf16 with the SmolLM2 chat-rendered prompt ids, B in {1, 32}, N=128 (``--model smollm2`` for
the embedded one). ``--smoke``: a tiny random llama with a word-level tokenizer, B in {1, 4},
N=6 (tests the harness only).

Results: ``<out>/steering-<device-slug>.json`` and ``.md`` (``-smoke`` appended for
``--smoke``, then ``-<tag>`` for ``--tag``).

Usage::

    python -m bench.steering [--quick] [--batch 1 32] [--max-new-tokens N] [--repeats R]
                             [--alpha A] [--model smollm2|llama1b-random] [--modes graphs eager]
                             [--threads N] [--device cuda|cpu] [--out DIR] [--smoke] [--tag TAG]
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._util import (
    DTYPES,
    device_name,
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
from .generate import LLAMA_1B_CONFIG, PROMPTS, TINY_CONFIG, chat_ids, smoke_prompts


@dataclass(frozen=True)
class Config:
    """One steering configuration (see the module docstring)."""

    name: str
    letter: str
    description: str
    hooks: bool  # TokenGenerator(steering=...)
    layers: str | None  # None: no request steered; "middle" or "all"
    per_request: bool = False  # a different vector per request
    half: bool = False  # only even requests steered
    min_batch: int = 1


CONFIGS: tuple[Config, ...] = (
    Config("none", "a", "steering=False generator (no hooks)", False, None),
    Config("idle-hooks", "b", "hooks installed, no request steered", True, None),
    Config("one-layer", "c", "middle layer, same vector for every request", True, "middle"),
    Config("all-layers", "d", "every layer, same vector for every request", True, "all"),
    Config("all-layers-per-request", "e", "every layer, a different vector per request", True,
           "all", per_request=True),
    Config("half-steered", "f", "even requests as (e), odd requests unsteered", True, "all",
           per_request=True, half=True, min_batch=2),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)
MODEL_NAMES = ("smollm2", "llama1b-random")
#: Targets of the issue: max slowdown (fraction) per (config, device type).
TARGETS: dict[str, dict[str, float]] = {
    "one-layer": {"cuda": 0.03, "cpu": 0.05},
    "all-layers-per-request": {"cuda": 0.10, "cpu": 0.10},
}


# --------------------------------------------------------------------------- workload
@dataclass
class Workload:
    name: str
    description: str
    model: Any
    tokenizer: Any
    prompts: list[list[int]]
    dtype_name: str
    num_layers: int = 0
    hidden_size: int = 0
    layer_norms: list[float] = field(default_factory=list)


def build_workload(model_name: str, smoke: bool, dev: torch.device, dtype: str | None) -> Workload:
    if smoke:
        dtype_name = dtype or "fp32"
        model = random_llama(DTYPES[dtype_name], dev, **TINY_CONFIG)
        return Workload("tiny-llama-random", "tiny random llama (2 layers, hidden 64, V=320)",
                        model, word_tokenizer(TINY_CONFIG["vocab_size"]),
                        smoke_prompts(len(PROMPTS), TINY_CONFIG["vocab_size"]), dtype_name)
    from decodekit.loading import DEFAULT_MODEL, load

    dtype_name = dtype or ("bf16" if dev.type == "cuda" else "fp32")
    small, tok = load(device=dev, dtype=DTYPES[dtype_name])
    prompts = chat_ids(tok, PROMPTS)
    if model_name == "smollm2":
        return Workload("smollm2-135m", f"{DEFAULT_MODEL} (embedded)", small, tok, prompts,
                        dtype_name)
    del small
    model = random_llama(DTYPES[dtype_name], dev, **LLAMA_1B_CONFIG)
    return Workload("llama1b-random", "random init, Llama-3.2-1B shape", model,
                    word_tokenizer(LLAMA_1B_CONFIG["vocab_size"]), prompts, dtype_name)


def n_hooks(model: Any) -> int:
    """Forward hooks on the decoder layers (decodekit installs one per layer per generator)."""
    from decodekit.steer_hooks import decoder_layers

    return sum(len(layer._forward_hooks) for layer in decoder_layers(model))


@torch.inference_mode()
def layer_norms(wl: Workload, n_prompts: int, device: torch.device) -> list[float]:
    """Median L2 norm of every decoder layer's output over the prompts' tokens (position 0,
    the attention sink, left out), read by temporary forward hooks (not output_hidden_states,
    which makes transformers install recorder hooks that would stay on the model)."""
    from decodekit.steer_hooks import decoder_layers

    layers = decoder_layers(wl.model)
    norms: list[list[torch.Tensor]] = [[] for _ in layers]

    def record(i: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            norms[i].append(h[0, 1:].float().norm(dim=-1).cpu())
        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        for p in wl.prompts[:n_prompts]:
            wl.model(input_ids=torch.tensor([p], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [float(torch.cat(n).median()) for n in norms]


def make_steering(wl: Workload, cfg: Config, batch: int, alpha: float, seed: int = 0
                  ) -> list[Any | None]:
    """Per request: a :class:`decodekit.Steering` or None, as ``cfg`` says."""
    from decodekit import Steering, SteeringVector

    if cfg.layers is None:
        return [None] * batch
    L, H = wl.num_layers, wl.hidden_size
    layers = [L // 2] if cfg.layers == "middle" else list(range(L))
    scale = alpha / (math.sqrt(L) if cfg.layers == "all" else 1.0)
    gen = torch.Generator().manual_seed(seed)
    n_vec = batch if cfg.per_request else 1
    raw = torch.randn(n_vec, L, H, generator=gen)
    raw = raw / raw.norm(dim=-1, keepdim=True)
    vecs = [SteeringVector({i: raw[j, i] * scale * wl.layer_norms[i] for i in layers})
            for j in range(n_vec)]
    out: list[Any | None] = []
    for j in range(batch):
        if cfg.half and j % 2 == 1:
            out.append(None)
        else:
            out.append(Steering(vecs[j if cfg.per_request else 0], strength=1.0,
                                positions="all", op="add"))
    return out


# --------------------------------------------------------------------------- one run
@dataclass
class Run:
    prefill_s: float
    step_s: list[float]
    tokens: list[list[int]]

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


def generate(gen: Any, prompts: list[list[int]], steering: list[Any | None], n: int,
             device: torch.device) -> Run:
    """``n`` greedy tokens for every prompt, one ``next_token`` call per step, timed."""
    from decodekit import SamplingParams

    ctxs = {f"r{i}": gen.new_context(p, SamplingParams(temperature=0.0, max_new_tokens=n,
                                                       ignore_eos=True),
                                     request_id=f"r{i}", steering=s)
            for i, (p, s) in enumerate(zip(prompts, steering, strict=True))}
    try:
        synchronize(device)
        t0 = time.perf_counter()
        gen.next_token(ctxs, 1)
        synchronize(device)
        run = Run(time.perf_counter() - t0, [], [])
        while not all(c.is_done for c in ctxs.values()):
            t0 = time.perf_counter()
            gen.next_token(ctxs, 1)
            synchronize(device)
            run.step_s.append(time.perf_counter() - t0)
            if len(run.step_s) > 4 * n:
                raise RuntimeError(f"requests not done after {len(run.step_s)} steps")
        run.tokens = [list(c.generated_token_ids) for c in ctxs.values()]
    finally:
        for c in ctxs.values():
            gen.release(c)
    bad = [len(t) for t in run.tokens if len(t) != n]
    if bad:
        raise RuntimeError(f"generated {bad} tokens instead of {n}")
    return run


def run_config(wl: Workload, cfg: Config, mode: str, batch: int, n: int, warmup: int,
               steering: list[Any | None], device: torch.device, hooks0: int) -> Run:
    """A fresh generator for ``cfg``; hook-count checks; a warm-up; one timed generation."""
    from decodekit import TokenGenerator

    prompts = [wl.prompts[i % len(wl.prompts)] for i in range(batch)]
    longest = max(map(len, prompts))
    max_seq = -(-(longest + n) // 64) * 64
    gen = TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=max_seq,
                         seed=0, steering=cfg.hooks, cuda_graphs=(mode == "graphs"))
    try:
        want = hooks0 + (wl.num_layers if cfg.hooks else 0)
        if n_hooks(wl.model) != want:
            raise RuntimeError(f"{n_hooks(wl.model)} forward hooks on the decoder layers, "
                               f"expected {want}")
        if warmup > 0:
            generate(gen, prompts, steering, warmup, device)
        return generate(gen, prompts, steering, n, device)
    finally:
        del gen
        gc.collect()
        if n_hooks(wl.model) != hooks0:
            raise RuntimeError("the steering hooks outlived their generator")


# --------------------------------------------------------------------------- one point
def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _slowdown(tok_s: float | None, base: float | None) -> float | None:
    """Percent slower than ``base`` in tokens/s."""
    if tok_s is None or not base:
        return None
    return (1.0 - tok_s / base) * 100.0


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def run_point(wl: Workload, mode: str, batch: int, opts: Options, device: torch.device,
              hooks0: int) -> list[dict[str, Any]]:
    """All configurations at one (mode, batch), interleaved over the repeats; one row each."""
    cfgs = [c for c in CONFIGS if batch >= c.min_batch and c.name in opts.configs]
    steering = {c.name: make_steering(wl, c, batch, opts.alpha, seed=1) for c in cfgs}
    runs: dict[str, list[Run | None]] = {c.name: [] for c in cfgs}
    status = {c.name: "ok" for c in cfgs}
    load: list[float] = []
    for r in range(opts.repeats):
        order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
        for c in order:
            run: Run | None = None
            if status[c.name] == "ok":
                try:
                    run = run_config(wl, c, mode, batch, opts.max_new_tokens, opts.warmup_tokens,
                                     steering[c.name], device, hooks0)
                except Exception as exc:
                    if os.environ.get("BENCH_TRACEBACK"):
                        traceback.print_exc()
                    status[c.name] = f"error: {_short(exc)}"
            runs[c.name].append(run)
            la = load_average()
            if la is not None:
                load.append(la)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    n = opts.max_new_tokens
    base_runs = [x for x in runs.get("none", []) if x is not None]
    base_tok_s = batch * (n - 1) / _median([x.decode_s for x in base_runs]) if base_runs else None
    base_step = _median([t for x in base_runs for t in x.step_s]) if base_runs else None
    base_tokens = base_runs[-1].tokens if base_runs else None
    rows = []
    for c in cfgs:
        ok = [x for x in runs[c.name] if x is not None]
        row: dict[str, Any] = {
            "config": c.name, "letter": c.letter, "description": c.description, "mode": mode,
            "batch": batch, "max_new_tokens": n, "decode_tokens": batch * (n - 1),
            "repeats": opts.repeats, "status": status[c.name], "model": wl.name,
            "dtype": wl.dtype_name,
            "steered_requests": sum(s is not None for s in steering[c.name]),
            "steered_layers": (0 if c.layers is None else 1 if c.layers == "middle"
                               else wl.num_layers),
            "load_avg_1m": {"min": min(load, default=None), "max": max(load, default=None)},
        }
        if not ok or status[c.name] != "ok":
            row.update(tok_s=None, overhead_pct=None)
            rows.append(row)
            continue
        decode_s = _median([x.decode_s for x in ok])
        step = _median([t for x in ok for t in x.step_s])
        row.update(
            tok_s=batch * (n - 1) / decode_s, decode_s=decode_s,
            decode_s_all=[x.decode_s for x in ok], prefill_ms=_median([x.prefill_s for x in ok]) * 1e3,
            step_ms_median=step * 1e3,
        )
        row["overhead_pct"] = _slowdown(row["tok_s"], base_tok_s)
        row["overhead_pct_median_step"] = None if base_step is None else (step / base_step - 1) * 100
        base_all = runs.get("none", [None] * len(runs[c.name]))
        paired = [(1 - b.decode_s / x.decode_s) * 100
                  for x, b in zip(runs[c.name], base_all, strict=True) if x is not None and b is not None]
        row["overhead_pct_paired"] = _median(paired) if paired else None
        row["overhead_pct_paired_all"] = paired
        toks = ok[-1].tokens
        row["deterministic"] = all(x.tokens == toks for x in ok)
        row["sample_text"] = wl.tokenizer.decode(toks[0], skip_special_tokens=True)
        if base_tokens is not None:
            same = [toks[i] == base_tokens[i] for i in range(batch)]
            agree = [sum(a == b for a, b in zip(toks[i], base_tokens[i], strict=True)) / n
                     for i in range(batch)]
            row["rows_identical_to_baseline"] = sum(same)
            row["token_agreement"] = sum(agree) / batch
            steered = [s is not None for s in steering[c.name]]
            row["unsteered_rows_identical"] = [same[i] for i in range(batch) if not steered[i]]
            row["steered_rows_identical"] = [same[i] for i in range(batch) if steered[i]]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- targets
def evaluate_targets(rows: Sequence[dict[str, Any]], device_type: str) -> dict[str, Any]:
    """Target verdicts per (config, mode, batch), plus the token-agreement checks."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    out: dict[str, Any] = {"device_kind": kind, "checks": [], "token_checks": {}}
    for r in rows:
        limit = TARGETS.get(r["config"], {}).get(kind)
        if limit is not None:
            ov = r.get("overhead_pct")
            out["checks"].append({
                "config": r["config"], "mode": r["mode"], "batch": r["batch"],
                "limit_pct": limit * 100, "overhead_pct": ov,
                "overhead_pct_paired": r.get("overhead_pct_paired"),
                "overhead_pct_median_step": r.get("overhead_pct_median_step"),
                # verdict on the paired overhead (each run against the same repeat's baseline),
                # so one load spike in one repeat cannot flip it
                "met": (None if r.get("overhead_pct_paired", ov) is None
                        else r.get("overhead_pct_paired", ov) <= limit * 100),
            })
    ok_rows = [r for r in rows if r.get("tok_s") is not None and "rows_identical_to_baseline" in r]
    idle = [r for r in ok_rows if r["config"] == "idle-hooks"]
    steered = [r for r in ok_rows if r["steered_requests"] > 0]
    half = [r for r in ok_rows if r["config"] == "half-steered"]
    tc = out["token_checks"]
    tc["idle_hooks_identical"] = bool(idle) and all(
        r["rows_identical_to_baseline"] == r["batch"] for r in idle)
    tc["steered_configs_differ"] = {
        f"{r['config']}/{r['mode']}/B={r['batch']}": r["rows_identical_to_baseline"] < r["batch"]
        for r in steered}
    tc["every_steered_config_differs"] = bool(steered) and all(tc["steered_configs_differ"].values())
    tc["half_steered_unsteered_rows_identical"] = (
        None if not half else all(all(r["unsteered_rows_identical"]) for r in half))
    tc["deterministic"] = all(r["deterministic"] for r in ok_rows)
    out["all_targets_met"] = bool(out["checks"]) and all(c["met"] for c in out["checks"])
    return out


# --------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = "{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for r in rows:
        paired = r.get("overhead_pct_paired_all") or []
        agree = "-" if "rows_identical_to_baseline" not in r else (
            f"{r['rows_identical_to_baseline']}/{r['batch']} ({r['token_agreement']:.0%})")
        out.append([
            f"({r['letter']}) {r['config']}", r["mode"], r["batch"], r["steered_requests"],
            r["steered_layers"], _f(r.get("tok_s")), _pct(r.get("overhead_pct")),
            _pct(r.get("overhead_pct_paired")),
            "-" if not paired else f"{min(paired):+.1f} .. {max(paired):+.1f}",
            _pct(r.get("overhead_pct_median_step")), _f(r.get("step_ms_median"), "{:.2f}"),
            _f(r.get("prefill_ms"), "{:,.0f}"), agree,
            r["status"] if r["status"] != "ok" else "ok",
        ])
    return out


HEADERS = ["config", "mode", "B", "steered req", "steered layers", "decode tok/s",
           "overhead", "overhead (paired)", "paired range", "overhead (median step)",
           "median step ms", "prefill ms", "rows = (a) (token agreement)", "status"]


def render_markdown(meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    t = meta["targets"]
    tc = t["token_checks"]
    lines = [
        f"# Steering benchmark: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- timestamp: {meta['timestamp']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, triton {meta['triton']}, "
        f"python {meta['python']}",
        f"- torch threads: {meta['cpu_threads']} ({meta['cpu_count']} cores); 1-minute load "
        f"average {meta['load_avg_1m']} at the start, {meta['load_avg_1m_end']} at the end "
        f"(max seen {meta['load_avg_1m_max_seen']})",
        f"- model: {meta['model']} ({meta['dtype']}, {meta['num_layers']} decoder layers, hidden "
        f"{meta['hidden_size']}); greedy, ignore_eos, N = {meta['max_new_tokens']} new tokens "
        f"per request, B in {meta['batches']}; prompts: the first B chat prompts of "
        "bench.generate",
        f"- steering: op add, strength 1, positions all; random directions of norm alpha x "
        f"(median hidden-state norm of the layer), / sqrt(L) when all L layers are steered; "
        f"alpha = {meta['alpha']}; one layer = layer {meta['middle_layer']}",
        f"- {meta['repeats']} repeat(s), configurations interleaved (order rotated per repeat); "
        f"every run: a fresh generator, a {meta['warmup_tokens']}-token warm-up generation, one "
        "timed generation",
        "- decode tok/s = B * (N - 1) / (sum of the next_token calls after the first, prefill, "
        "one), median over repeats; overhead = 1 - tok/s / (a)'s tok/s (percent slower); paired "
        "= median over repeats of each run against (a)'s run of the same repeat (range: min .. "
        "max); median step = over all decode steps of all repeats",
        "- rows = (a): requests whose tokens equal the baseline's, token for token (token "
        "agreement: share of positions equal)",
        "",
    ]
    lines.append(markdown_table(HEADERS, table_rows(rows)))
    lines += ["", "Targets (percent slower than (a) in decode tok/s):", ""]
    for c in t["checks"]:
        lines.append(
            f"- {c['config']}, {c['mode']}, B={c['batch']}: {_pct(c['overhead_pct'])} (paired "
            f"{_pct(c['overhead_pct_paired'])}, median step {_pct(c['overhead_pct_median_step'])})"
            f"; target <= {c['limit_pct']:.0f}% ({t['device_kind']}): {_verdict(c['met'])}")
    lines += [
        "", "Token checks:", "",
        f"- (b) idle hooks identical to (a), token for token, every request: "
        f"{'yes' if tc['idle_hooks_identical'] else 'NO'}",
        "- steered configurations differ from (a) on at least one request: "
        + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in tc["steered_configs_differ"].items()),
    ]
    if tc["half_steered_unsteered_rows_identical"] is not None:
        lines.append("- (f) the unsteered requests of a half-steered batch identical to (a): "
                     f"{'yes' if tc['half_steered_unsteered_rows_identical'] else 'NO'}")
    lines.append(f"- every configuration generated the same tokens in every repeat: "
                 f"{'yes' if tc['deterministic'] else 'NO'}")
    samples = [r for r in rows if r.get("sample_text") is not None and r["batch"] == max(meta["batches"])
               and r["mode"] == meta["modes"][0]]
    if samples:
        lines += ["", f"Request 0's output (B={samples[0]['batch']}, {samples[0]['mode']}):", ""]
        lines += [f"- ({r['letter']}) {r['config']}: `{' '.join(r['sample_text'].split())[:120]}`"
                  for r in samples]
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "Notes:", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def format_row_line(r: dict[str, Any]) -> str:
    head = f"({r['letter']}) {r['config']:<22} {r['mode']:<6} B={r['batch']:<3}"
    if r.get("tok_s") is None:
        return f"{head} | {r['status']}"
    agree = "" if "rows_identical_to_baseline" not in r else \
        f" | rows = (a) {r['rows_identical_to_baseline']}/{r['batch']} ({r['token_agreement']:.0%})"
    return (f"{head} | {r['tok_s']:8.1f} tok/s | overhead {_pct(r['overhead_pct'])} (paired "
            f"{_pct(r.get('overhead_pct_paired'))}, median step "
            f"{_pct(r.get('overhead_pct_median_step'))}){agree}")


# --------------------------------------------------------------------------- CLI
@dataclass
class Options:
    batches: list[int]
    max_new_tokens: int
    repeats: int
    warmup_tokens: int
    alpha: float
    modes: list[str]
    configs: list[str]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.steering",
        description="Decode tokens/s of decodekit's TokenGenerator with per-request steering "
                    "(none, idle hooks, one layer, all layers, per-request vectors) at B 1 and 32.",
    )
    p.add_argument("--quick", action="store_true", help="fewer repeats (3; default 5)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random llama + word tokenizer, B 1 and 4, 6 new tokens, 2 repeats")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes (default 1 32)")
    p.add_argument("--max-new-tokens", type=int, metavar="N",
                   help="tokens per request (default 24 on CPU, 128 on CUDA, 6 with --smoke)")
    p.add_argument("--repeats", type=int, help="timed runs per configuration")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="injected norm / median hidden-state norm (default 0.5)")
    p.add_argument("--configs", nargs="+", choices=CONFIG_NAMES,
                   help="configurations (default: all; 'none' is always run)")
    p.add_argument("--model", choices=MODEL_NAMES,
                   help="default: smollm2 on CPU, llama1b-random on CUDA")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="model dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--modes", nargs="+", choices=("graphs", "eager"),
                   help="CUDA step modes (default both; CPU: eager)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 2 on CPU (1 with --smoke), torch's "
                        "choice on CUDA; 0: torch's own choice")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench/results", help="directory for the JSON/markdown files")
    p.add_argument("--tag", default=None,
                   help="suffix of the result files: steering-<device-slug>-<tag>.{json,md}")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    threads = args.threads if args.threads is not None else (
        0 if cuda else (1 if args.smoke else 2))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    n = args.max_new_tokens or (6 if args.smoke else (128 if cuda else 24))
    if n < 2:
        raise SystemExit("--max-new-tokens must be >= 2 (the first token is prefill)")
    modes = args.modes or (["graphs", "eager"] if cuda else ["eager"])
    if not cuda and "graphs" in modes:
        raise SystemExit("--modes graphs needs CUDA")
    opts = Options(
        batches=args.batch or ([1, 4] if args.smoke else [1, 32]), max_new_tokens=n,
        repeats=args.repeats or (2 if args.smoke else (3 if args.quick else 5)),
        warmup_tokens=2 if args.smoke else 4, alpha=args.alpha, modes=modes,
        configs=sorted({"none", *(args.configs or CONFIG_NAMES)}, key=CONFIG_NAMES.index),
    )

    print(f"device: {device_name(dev)}, {torch.get_num_threads()} torch thread(s)")
    load_start = load_average()
    if not cuda and load_start is not None and load_start > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load_start} on {os.cpu_count()} cores; CPU timings "
              "will be noisy", file=sys.stderr)
    model_name = args.model or ("llama1b-random" if cuda else "smollm2")
    wl = build_workload(model_name, args.smoke, dev, args.dtype)
    from decodekit.steer_hooks import _hidden_size, decoder_layers

    wl.num_layers = len(decoder_layers(wl.model))
    wl.hidden_size = _hidden_size(wl.model)
    wl.layer_norms = layer_norms(wl, 8, dev)
    hooks0 = n_hooks(wl.model)
    print(f"model: {wl.description}, {wl.num_layers} layers, hidden {wl.hidden_size}; median "
          f"hidden-state norm per layer {min(wl.layer_norms):.1f} .. {max(wl.layer_norms):.1f}")

    rows: list[dict[str, Any]] = []
    for mode in opts.modes:
        for batch in opts.batches:
            for row in run_point(wl, mode, batch, opts, dev, hooks0):
                rows.append(row)
                print(format_row_line(row), flush=True)

    notes = []
    if cuda and "graphs" in opts.modes:
        notes.append("graphs mode: a batch with any steered request runs its decode steps eagerly "
                     "(CUDA graphs hold no steering), so (c)-(f) there include the loss of the "
                     "graphs; eager mode compares eager with eager (the hooks' own cost)")
    notes.append("(b) skips binding entirely (no request steered), so its hooks return at once; "
                 "in (c) the hooks of the unsteered layers return at once too")
    meta = metadata(
        dev, threads=torch.get_num_threads(), smoke=bool(args.smoke), model=wl.description,
        model_name=wl.name, dtype=wl.dtype_name, num_layers=wl.num_layers,
        hidden_size=wl.hidden_size, middle_layer=wl.num_layers // 2,
        layer_norms=wl.layer_norms, alpha=opts.alpha, max_new_tokens=n, batches=opts.batches,
        repeats=opts.repeats, warmup_tokens=opts.warmup_tokens, modes=opts.modes,
        configs={c.name: f"({c.letter}) {c.description}" for c in CONFIGS if c.name in opts.configs},
        targets_spec={k: {d: f"<= {v * 100:.0f}%" for d, v in t.items()} for k, t in TARGETS.items()},
        notes=notes,
    )
    meta["load_avg_1m"] = load_start  # metadata() reads it now, at the end
    meta["load_avg_1m_end"] = load_average()
    meta["load_avg_1m_max_seen"] = max(
        [r["load_avg_1m"]["max"] for r in rows if r["load_avg_1m"]["max"] is not None]
        + [x for x in (load_start, meta["load_avg_1m_end"]) if x is not None], default=None)
    meta["targets"] = evaluate_targets(rows, dev.type)
    md = render_markdown(meta, rows)
    stem = result_stem("steering", dev, "smoke" if args.smoke else None, args.tag)
    json_path, md_path = write_results(args.out, stem, meta, rows, md)
    print()
    print(md)
    print(f"wrote {json_path} and {md_path}")
    tc = meta["targets"]["token_checks"]
    failed = any(r["status"] != "ok" for r in rows)
    if failed:
        print("some runs failed (see status above)", file=sys.stderr)
    wrong = not tc["idle_hooks_identical"] or tc["half_steered_unsteered_rows_identical"] is False
    if wrong:
        print("unsteered tokens differ from the baseline's", file=sys.stderr)
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
