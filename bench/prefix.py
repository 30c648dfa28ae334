"""Prefix-caching benchmark: many requests sharing a long system prompt, served by decodekit's
scheduler loop with and without prefix caching and by transformers' continuous batching
(``model.generate_batch``, its block sharing on) on the same prompts, in the same run. Reports
tokens/s, prompt tokens computed, peak KV memory held and the ratios; then the memory section:
how many requests of a realistic length mix fit in a fixed KV budget with static slots vs blocks;
then the step section: decode step time of the block cache against the static slot cache
(``kv_cache="slots"``, the previous decodekit) at a few batch sizes and context lengths.

Usage: ``python -m bench.prefix [--requests R] [--prefix P] [--suffix S] [--batch B]
[common flags, see --help]``
"""

from __future__ import annotations

import contextlib
import functools
import gc
import random
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload, prompt_set


def workload_prompts(wl: Workload, requests: int, prefix: int, suffix: int) -> list[list[int]]:
    """``requests`` prompts: one shared ``prefix``-token system text, then a ``suffix``-token
    question of each request's own."""
    texts = prompt_set("speculative_prompts")["copy"] + chat_prompts()
    shared: list[int] = []
    for t in texts:
        shared += wl.encode(t)
        if len(shared) >= prefix:
            break
    qs = chat_prompts()
    return [shared[:prefix] + (wl.encode(qs[i % len(qs)]) * 4)[:suffix - 1] + [3 + i % 97]
            for i in range(requests)]


def run_decodekit(wl: Workload, prompts: list[list[int]], n: int, batch: int, caching: bool,
                  dev: torch.device) -> dict[str, Any]:
    """One timed pass through decodekit's scheduler loop on a fresh generator."""
    import decodekit
    from decodekit.engine.scheduler import continuous_batching

    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch,
                                   max_seq_len=H.max_seq(prompts, n), seed=0, prefix_caching=caching)
    params = decodekit.SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
    ctxs = [gen.new_context(p, params, f"r{i}") for i, p in enumerate(prompts)]
    computed = reused = peak = 0

    def loop() -> None:
        nonlocal computed, reused, peak
        with contextlib.closing(continuous_batching(gen, ctxs)) as calls:
            for _ in calls:
                computed += gen.stats.prefill_tokens
                reused += gen.stats.prefix_hit_tokens
                peak = max(peak, H.kv_blocks_held(gen)[0])

    wall, _ = H.timed_call(loop, dev)
    toks = sum(len(c.generated_token_ids) for c in ctxs)
    held, per_block = H.kv_blocks_held(gen)
    return {"wall_s": wall, "tokens": toks, "tok_s": toks / wall, "prefill_computed": computed,
            "prefix_reused": reused, "peak_kv_mb": peak * per_block / 2**20,
            "outputs": [list(c.generated_token_ids) for c in ctxs]}


def run_hf(wl: Workload, prompts: list[list[int]], n: int, batch: int, block: int,
           dev: torch.device, warm: bool = True) -> dict[str, Any]:
    """``model.generate_batch`` (block sharing on, pages of ``block`` tokens, room for ``batch``
    full requests); ``warm``: its second call is timed (the first sets up its manager)."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=wl.pad_id,
                           do_sample=False, disable_compile=True)
    blocks = -(-batch * H.max_seq(prompts, n) // block)
    cb = H.cb_config(block, num_blocks=blocks, allow_block_sharing=True, max_requests_per_batch=batch)
    try:
        call = lambda: list(wl.model.generate_batch(prompts, generation_config=cfg, persistent_manager=True,
                                                    continuous_batching_config=cb).values())
        if warm:
            call()
        wall, out = H.timed_call(call, dev)
    finally:
        wl.model.destroy_cached_continuous_batching_manager()
    toks = sum(len(o.generated_tokens) for o in out)
    kv = H.kv_bytes_per_token(wl.model) * blocks * block
    return {"wall_s": wall, "tokens": toks, "tok_s": toks / wall, "peak_kv_mb": kv / 2**20,
            "outputs": [list(o.generated_tokens) for o in out]}


def memory_section(wl: Workload, budget: int, max_seq_len: int, block: int) -> dict[str, Any]:
    """Requests of a length mix (prompt 20..600 tokens + 16..256 new, log-uniform) admitted in order
    until a ``budget``-position cache is full: static slots of ``max_seq_len`` vs decodekit's
    block pool (each request holding blocks for its final length)."""
    from decodekit.engine.blocks import BlockPool

    rng = random.Random(0)
    lengths = [round(2 ** rng.uniform(4.3, 9.2)) + round(2 ** rng.uniform(4, 8)) for _ in range(4096)]
    pool, fit = BlockPool(budget // block + 1), 0
    while pool.num_usable >= -(-lengths[fit] // block):
        for _ in range(-(-lengths[fit] // block)):
            pool.allocate()
        fit += 1
    slots = budget // max_seq_len
    return {"budget_tokens": budget, "max_seq_len": max_seq_len, "slots_fit": slots, "paged_fit": fit,
            "ratio": fit / max(slots, 1), "mean_length": sum(lengths[:fit]) / max(fit, 1),
            "budget_mb": budget * H.kv_bytes_per_token(wl.model) / 2**20}


def step_section(wl: Workload, dev: torch.device, points: Sequence[tuple[int, int]], steps: int,
                 repeats: int) -> list[dict[str, Any]]:
    """Median ms per decode step (``next_token(num_steps=steps)`` after the prefill) of
    ``kv_cache="paged"`` and ``"slots"`` at each ``(batch, context)`` point, sides interleaved."""
    import decodekit

    out = []
    for batch, ctx in points:
        prompts = [[3 + (i * 7919 + j * 104729) % (wl.model.config.vocab_size - 3) for j in range(ctx)]
                   for i in range(batch)]
        n = steps * (repeats + 1)
        gens, batches = {}, {}
        for kind in ("paged", "slots"):
            gens[kind] = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch,
                                                  max_seq_len=ctx + n + 8, seed=0, kv_cache=kind)
            params = decodekit.SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)
            ctxs = [gens[kind].new_context(p, params) for p in prompts]
            batches[kind] = {c.request_id: c for c in ctxs}
            gens[kind].next_token(batches[kind], num_steps=1)  # prefill
        times: dict[str, list[float]] = {k: [] for k in gens}
        for _ in range(repeats):
            for kind, gen in gens.items():
                wall, _ = H.timed_call(functools.partial(gen.next_token, batches[kind], num_steps=steps), dev)
                times[kind].append(wall * 1e3 / steps)
        row = {"batch": batch, "context": ctx, **{f"{k}_ms": H.median(v) for k, v in times.items()}}
        row["ratio"] = row["slots_ms"] / row["paged_ms"]
        print(row, flush=True)
        out.append(row)
        gens.clear()
        gc.collect()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.prefix", __doc__.splitlines()[0])
    for flag, what in (("requests", "requests (64)"), ("prefix", "shared prompt tokens (300)"),
                       ("suffix", "own prompt tokens (20)"), ("batch", "max running requests (16)")):
        p.add_argument(f"--{flag}", type=int, help=what)
    args = p.parse_args(argv)
    dev, smoke, block = H.setup(args), args.smoke, 16
    R = args.requests or (6 if smoke else 16 if args.quick else 64)
    P, S = args.prefix or (40 if smoke else 300), args.suffix or (6 if smoke else 20)
    B = args.batch or (3 if smoke else 16)
    n = H.check_tokens(args.max_new_tokens or (4 if smoke else 16 if args.quick else 64))
    repeats = args.repeats or (1 if smoke or args.quick else 2)
    wl = load_workload("random:tiny" if smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    prompts = workload_prompts(wl, R, P, S)
    sides = {"dk prefix caching": lambda: run_decodekit(wl, prompts, n, B, True, dev),
             "dk no prefix caching": lambda: run_decodekit(wl, prompts, n, B, False, dev),
             "HF generate_batch": lambda: run_hf(wl, prompts, n, B, block, dev, warm=not smoke)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for _ in range(repeats):  # sides interleaved
        for name, fn in sides.items():
            try:
                runs[name].append(fn())
            except Exception as exc:  # noqa: BLE001 - a side failing is a result, not a crash
                runs[name].append({"status": H.short_error(exc)})
            gc.collect()
    base, rows = runs["dk prefix caching"][-1].get("outputs"), []
    for name, rs in runs.items():
        ok = [r for r in rs if "status" not in r]
        row = {"side": name, "status": "ok" if ok else rs[-1]["status"]}
        if ok:
            row.update({k: v for k, v in ok[-1].items() if k != "outputs"})
            row["wall_s"] = H.median([r["wall_s"] for r in ok])
            row["tok_s"] = row["tokens"] / row["wall_s"]
            row["identical"] = base and sum(a == b for a, b in zip(ok[-1]["outputs"], base, strict=True)) / R
        rows.append(row)
    for r in rows:
        r["ratio"] = rows[0]["tok_s"] / r["tok_s"] if r.get("tok_s") and rows[0].get("tok_s") else None
        print(r, flush=True)
    step_points = [(2, 20)] if smoke else [(1, 300), (8, 20), (8, 100), (8, 300)]
    steps = step_section(wl, dev, step_points, 2 if smoke else 8, 1 if smoke else 2 * repeats + 1)
    mem = memory_section(wl, 4 * 256 if smoke else 16 * 2048, 256 if smoke else 2048, block)
    meta = H.metadata(dev, "wall time (time.perf_counter, device synchronised) of the whole serving loop, "
                      "median over repeats, sides interleaved", model=f"{wl.description}, {wl.dtype_name}",
                      requests=R, shared_prefix=P, suffix=S, max_batch=B, max_new_tokens=n, repeats=repeats,
                      block_size=block, memory=mem, steps=steps)
    body = [f"- {R} requests: a shared {P}-token prefix + {S} own tokens, {n} new tokens each (greedy, "
            f"ignore EOS), at most {B} running; KV blocks of {block} positions on every side; HF's peak KV "
            "is its preallocated cache", "",
            H.table(["side", "tok/s", "dk prefix caching / side", "prompt tokens computed", "reused",
                     "peak KV MB", "outputs = dk prefix caching"],
                    [[r["side"], H.f(r.get("tok_s")), H.ratio(r.get("ratio")),
                      H.f(r.get("prefill_computed"), "{:,.0f}"), H.f(r.get("prefix_reused"), "{:,.0f}"),
                      H.f(r.get("peak_kv_mb")), H.f(r.get("identical"), "{:.0%}")] if r["status"] == "ok"
                     else [r["side"], r["status"], "", "", "", "", ""] for r in rows]),
            "", f"Memory: requests of a length mix (mean {mem['mean_length']:.0f} tokens) admitted until a "
            f"{mem['budget_tokens']:,}-position KV budget ({mem['budget_mb']:.0f} MB) is full: static slots "
            f"of {mem['max_seq_len']} fit {mem['slots_fit']}, blocks of {block} fit {mem['paged_fit']} "
            f"({H.ratio(mem['ratio'])}).", "",
            "Decode step, block cache vs static slots (the previous decodekit; same prompts, greedy, "
            "ms per step, median; ratio > 1: blocks faster):", "",
            H.table(["B", "context", "paged ms", "slots ms", "slots / paged"],
                    [[r["batch"], r["context"], H.f(r["paged_ms"], "{:.2f}"), H.f(r["slots_ms"], "{:.2f}"),
                      H.ratio(r["ratio"])] for r in steps])]
    H.report("prefix", "Prefix-caching benchmark", args, meta, rows, body)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
