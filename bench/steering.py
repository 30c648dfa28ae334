"""Steering benchmark: decode tokens/s of :class:`~decodekit.TokenGenerator` with per-request steering
against the same generator without it: (a) no hooks, (b) idle hooks, (c) one layer, (d) all layers,
(e) all layers with a vector per request, (f) half the batch steered; token checks against (a).
Method: bench/README.md.

Usage: ``python -m bench.steering [--quick] [--batch 1 32] [--alpha A] [--configs ..]
[--modes graphs eager] [common flags, see --help]``
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload


@dataclass(frozen=True)
class Config:
    name: str
    letter: str
    description: str
    hooks: bool  # TokenGenerator(steering=...)
    layers: str | None  # None: no request steered; "middle" or "all"
    per_request: bool = False  # a different vector per request
    half: bool = False  # only even requests steered
    min_batch: int = 1


CONFIGS = (
    Config("none", "a", "steering=False generator (no hooks)", False, None),
    Config("idle-hooks", "b", "hooks installed, no request steered", True, None),
    Config("one-layer", "c", "middle layer, same vector for every request", True, "middle"),
    Config("all-layers", "d", "every layer, same vector for every request", True, "all"),
    Config("all-layers-per-request", "e", "every layer, a different vector per request", True, "all",
           per_request=True),
    Config("half-steered", "f", "even requests as (e), odd requests unsteered", True, "all",
           per_request=True, half=True, min_batch=2),
)
#: The issue's targets: max slowdown in percent per (config, device type).
TARGETS = {"one-layer": {"cuda": 3.0, "cpu": 5.0}, "all-layers-per-request": {"cuda": 10.0, "cpu": 10.0}}


@torch.inference_mode()
def layer_norms(wl: Workload, prompts: list[list[int]]) -> list[float]:
    """Median L2 norm of each decoder layer's output over the prompts' tokens (position 0, the
    attention sink, left out), read by temporary forward hooks."""
    layers = H.decoder_layers(wl.model)
    norms: list[list[torch.Tensor]] = [[] for _ in layers]

    def record(i: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:  # out: [1, T, H] (or a tuple of it)
            norms[i].append((out[0] if isinstance(out, tuple) else out)[0, 1:].float().norm(dim=-1).cpu())
        return hook

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        for p in prompts:
            wl.model(input_ids=torch.tensor([p], device=wl.model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [float(torch.cat(n).median()) for n in norms]


def make_steering(cfg: Config, batch: int, norms: list[float], hidden: int, alpha: float) -> list[Any]:
    """Per request a :class:`decodekit.Steering` or None: random directions of norm ``alpha`` x the
    layer's median hidden-state norm, / sqrt(L) when all L layers are steered."""
    from decodekit import Steering, SteeringVector

    if cfg.layers is None:
        return [None] * batch
    L = len(norms)
    layers = [L // 2] if cfg.layers == "middle" else list(range(L))
    scale = alpha / (math.sqrt(L) if cfg.layers == "all" else 1.0)
    raw = torch.randn(batch if cfg.per_request else 1, L, hidden, generator=torch.Generator().manual_seed(1))
    raw = raw / raw.norm(dim=-1, keepdim=True)
    vecs = [SteeringVector({i: raw[j, i] * scale * norms[i] for i in layers}) for j in range(len(raw))]
    return [None if cfg.half and j % 2 else Steering(vecs[j if cfg.per_request else 0], strength=1.0,
                                                     positions="all", op="add") for j in range(batch)]


def run_config(wl: Workload, cfg: Config, mode: str, prompts: list[list[int]], steering: list[Any],
               n: int, dev: torch.device, hooks0: int) -> H.GenRun:
    """A fresh generator (its hooks go with it), hook-count checks, a warm-up, one timed generation."""
    from decodekit import SamplingParams, TokenGenerator

    gen = TokenGenerator(wl.model, wl.tokenizer, max_batch_size=len(prompts), seed=0,
                         max_seq_len=H.max_seq(prompts, n), steering=cfg.hooks,
                         cuda_graphs=mode == "graphs")
    try:
        want = hooks0 + (len(H.decoder_layers(wl.model)) if cfg.hooks else 0)
        if H.layer_hook_count(wl.model) != want:
            raise RuntimeError(f"{H.layer_hook_count(wl.model)} hooks on the decoder layers, expected {want}")
        params = lambda k: [SamplingParams(temperature=0.0, max_new_tokens=k, ignore_eos=True)] * len(prompts)
        H.timed_generate(gen, prompts, params(min(4, n)), dev, steering)
        return H.timed_generate(gen, prompts, params(n), dev, steering)
    finally:
        del gen
        gc.collect()
        if H.layer_hook_count(wl.model) != hooks0:
            raise RuntimeError("the steering hooks outlived their generator")


def run_point(wl: Workload, mode: str, batch: int, args: Any, n: int, norms: list[float],
              dev: torch.device, hooks0: int) -> list[dict[str, Any]]:
    """All configurations at one (mode, B), interleaved over the repeats in a rotating order."""
    all_prompts = wl.encode_all(chat_prompts())
    prompts = [all_prompts[i % len(all_prompts)] for i in range(batch)]
    cfgs = [c for c in CONFIGS if batch >= c.min_batch and c.name in args.configs]
    hidden = wl.model.config.get_text_config().hidden_size
    steering = {c.name: make_steering(c, batch, norms, hidden, args.alpha) for c in cfgs}
    runs: dict[str, list[H.GenRun | None]] = {c.name: [] for c in cfgs}
    status = {c.name: "ok" for c in cfgs}
    for r in range(args.repeats):
        for c in cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]:
            run = None
            if status[c.name] == "ok":
                try:
                    run = run_config(wl, c, mode, prompts, steering[c.name], n, dev, hooks0)
                except Exception as exc:
                    status[c.name] = H.short_error(exc)
            runs[c.name].append(run)
    base = [x for x in runs["none"] if x is not None]
    base_s = H.median([x.decode_s for x in base]) if base else None
    base_step = H.median([t for x in base for t in x.step_s]) if base else None
    nbytes = wl.step_bytes(batch, sum(map(len, prompts)) / batch + n / 2)
    rows = []
    for c in cfgs:
        ok = [x for x in runs[c.name] if x is not None]
        steered = [s is not None for s in steering[c.name]]
        row: dict[str, Any] = {
            "config": c.name, "letter": c.letter, "mode": mode, "batch": batch, "max_new_tokens": n,
            "status": status[c.name], "steered_requests": sum(steered),
            "steered_layers": 0 if c.layers is None else 1 if c.layers == "middle" else len(norms)}
        if not ok or status[c.name] != "ok" or base_s is None:
            rows.append(row)
            continue
        decode_s = H.median([x.decode_s for x in ok])
        toks, base_toks = ok[-1].tokens, base[-1].tokens
        same = [a == b for a, b in zip(toks, base_toks, strict=True)]
        paired = [(1 - b.decode_s / x.decode_s) * 100 for x, b in zip(runs[c.name], runs["none"], strict=True)
                  if x is not None and b is not None]
        row.update(
            tok_s=batch * (n - 1) / decode_s, decode_s_all=[x.decode_s for x in ok],
            gb_s=H.gb_s(nbytes * (n - 1), decode_s), overhead_pct=(1 - base_s / decode_s) * 100,
            overhead_pct_paired=H.median(paired), overhead_pct_paired_all=paired,
            overhead_pct_median_step=(H.median([t for x in ok for t in x.step_s]) / base_step - 1) * 100,
            prefill_ms=H.median([x.prefill_s for x in ok]) * 1e3,
            deterministic=all(x.tokens == toks for x in ok), rows_identical_to_baseline=sum(same),
            token_agreement=sum(sum(a == b for a, b in zip(t, u, strict=True)) / n
                                for t, u in zip(toks, base_toks, strict=True)) / batch,
            unsteered_rows_identical=[s for s, st in zip(same, steered, strict=True) if not st],
            sample_text=wl.tokenizer.decode(toks[0], skip_special_tokens=True)[:200])
        rows.append(row)
    return rows


def checks(rows: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Target verdicts (on the paired overhead) and the token checks."""
    ok = [r for r in rows if "tok_s" in r]
    half = [r for r in ok if r["config"] == "half-steered"]
    targets = [{"config": r["config"], "mode": r["mode"], "batch": r["batch"], "limit_pct": lim,
                "overhead_pct_paired": r["overhead_pct_paired"], "met": r["overhead_pct_paired"] <= lim}
               for r in ok for lim in [TARGETS.get(r["config"], {}).get(kind)] if lim is not None]
    return {"checks": targets, "idle_hooks_identical": all(
                r["rows_identical_to_baseline"] == r["batch"] for r in ok if r["config"] == "idle-hooks"),
            "steered_configs_differ": {f"{r['config']}/{r['mode']}/B={r['batch']}":
                                       r["rows_identical_to_baseline"] < r["batch"]
                                       for r in ok if r["steered_requests"]},
            "half_steered_unsteered_rows_identical": all(all(r["unsteered_rows_identical"]) for r in half)
            if half else None, "deterministic": all(r["deterministic"] for r in ok)}


def line(r: dict[str, Any]) -> str:
    head = f"({r['letter']}) {r['config']:<22} {r['mode']} B={r['batch']:<3} | "
    if "tok_s" not in r:
        return head + r["status"]
    return (head + f"{r['tok_s']:.1f} tok/s ({H.f(r['gb_s'])} GB/s) | overhead {r['overhead_pct']:+.1f}% "
            f"(paired {r['overhead_pct_paired']:+.1f}%) | rows = (a) "
            f"{r['rows_identical_to_baseline']}/{r['batch']}")


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.steering", "Decode tok/s with per-request steering (none, idle hooks, one "
                 "layer, all layers, per-request vectors, half steered).")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes (default 1 32)")
    p.add_argument("--alpha", type=float, default=0.5, help="injected norm / hidden-state norm (0.5)")
    p.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], help="default: all")
    p.add_argument("--modes", nargs="+", choices=("graphs", "eager"), help="CUDA step modes (default both)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    cuda = dev.type == "cuda"
    args.configs = {"none", *(args.configs or [c.name for c in CONFIGS])}
    args.repeats = args.repeats or (2 if args.smoke else 3 if args.quick else 5)
    modes = args.modes or (["graphs", "eager"] if cuda else ["eager"])
    if not cuda and "graphs" in modes:
        raise SystemExit("--modes graphs needs CUDA")
    batches = args.batch or ([1, 4] if args.smoke else [1, 8] if args.quick else [1, 32])
    n = H.check_tokens(args.max_new_tokens or (
        6 if args.smoke else 128 if cuda else 12 if args.quick else 24))
    wl = load_workload("random:tiny" if args.smoke else (args.model or [
        "random:llama-1b" if cuda else "embedded"])[0], dev, args.dtype)
    norms = layer_norms(wl, wl.encode_all(chat_prompts()[:8]))
    hooks0 = H.layer_hook_count(wl.model)
    print(f"model: {wl.description}, {len(norms)} layers; median hidden-state norms "
          f"{min(norms):.1f} .. {max(norms):.1f}")
    rows: list[dict[str, Any]] = []
    for mode, b in [(m, b) for m in modes for b in batches]:
        new = run_point(wl, mode, b, args, n, norms, dev, hooks0)
        print("\n".join(line(r) for r in new), flush=True)
        rows += new
    tc = checks(rows, "cuda" if cuda else "cpu")
    pct = lambda x: H.f(x, "{:+.1f}%")
    body = [
        f"- model {wl.description}, {wl.dtype_name}, {len(norms)} layers; greedy, ignore_eos, N={n}, "
        f"B in {batches}; alpha {args.alpha} (one layer = layer {len(norms) // 2}); {args.repeats} "
        "repeats, configurations interleaved, a fresh generator per run", "",
        H.table(["config", "mode", "B", "steered req", "steered layers", "decode tok/s", "GB/s",
                 "overhead", "overhead (paired)", "overhead (median step)", "prefill ms",
                 "rows = (a) (agreement)", "status"],
                [[f"({r['letter']}) {r['config']}", r["mode"], r["batch"], r["steered_requests"],
                  r["steered_layers"], H.f(r.get("tok_s")), H.f(r.get("gb_s")), pct(r.get("overhead_pct")),
                  pct(r.get("overhead_pct_paired")), pct(r.get("overhead_pct_median_step")),
                  H.f(r.get("prefill_ms"), "{:,.0f}"), "-" if "tok_s" not in r else
                  f"{r['rows_identical_to_baseline']}/{r['batch']} ({r['token_agreement']:.0%})", r["status"]]
                 for r in rows]), "Targets (paired overhead, percent slower than (a)):", "",
        *[f"- {c['config']}, {c['mode']}, B={c['batch']}: {pct(c['overhead_pct_paired'])} (<= "
          f"{c['limit_pct']:.0f}%: {'met' if c['met'] else 'NOT met'})" for c in tc["checks"]], "",
        f"- (b) idle hooks identical to (a): {tc['idle_hooks_identical']}; (f) unsteered rows identical to "
        f"(a): {tc['half_steered_unsteered_rows_identical']}; deterministic: {tc['deterministic']}",
        "- steered configurations differ from (a): " + ", ".join(
            f"{k} {v}" for k, v in tc["steered_configs_differ"].items())]
    meta = H.metadata(dev, "wall time (time.perf_counter, device synchronised) of the decode calls after "
                      "prefill, median over repeats", model=wl.description, dtype=wl.dtype_name,
                      num_layers=len(norms), layer_norms=norms, alpha=args.alpha, max_new_tokens=n,
                      batches=batches, repeats=args.repeats, modes=modes, smoke=args.smoke, targets=tc,
                      configs={c.name: f"({c.letter}) {c.description}" for c in CONFIGS})
    H.report("steering", "Steering benchmark", args, meta, rows, body)
    wrong = not tc["idle_hooks_identical"] or tc["half_steered_unsteered_rows_identical"] is False
    if wrong:
        print("unsteered tokens differ from the baseline's", file=sys.stderr)
    return 1 if wrong or any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
