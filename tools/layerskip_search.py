"""Search the LayerSkipDraft layer subset and ``k`` for a model (greedy, B=1), and print the
``bench.speculative`` flags of the best. Phase 1: every (subset, k) once on the first 2 search
prompts, its speedup estimated against plain runs of the same prompts just before and after its
subset's k group. Phase 2: the ``--top`` best estimates (among candidates with any accepted draft)
timed again on all search prompts, interleaved with plain; the best timed speedup wins.

Usage: ``python -m tools.layerskip_search [--quick] [--top T] [--ks 2 3 4] [common flags]``
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

from bench import _harness as H
from bench._models import load_workload, prompt_set
from bench.speculative import Run, dk_side, make_gen


def candidates(L: int) -> list[tuple[str, list[int]]]:
    """(description, kept layers), each keeping and skipping at least one layer. For 30 layers:
    early exit (first 8..24), "first a + every s-th middle layer + last b", and "drop a middle
    block"; other depths scaled. At most 4 layers: each early exit and each single skipped layer."""
    out: list[tuple[str, list[int]]] = []

    def add(desc: str, keep: Any) -> None:
        k = sorted({i for i in keep if 0 <= i < L})
        if 0 < len(k) < L and all(k != c for _, c in out):
            out.append((desc, k))

    if L <= 4:
        for n in range(1, L):
            add(f"first {n}", range(n))
        for i in range(L):
            add(f"skip layer {i}", [j for j in range(L) if j != i])
        return out
    sc = lambda x: max(1, round(x * L / 30))
    for n in (8, 12, 16, 20, 24):
        add(f"first {sc(n)}", range(sc(n)))
    for a, b, s in ((2, 2, 3), (4, 2, 2), (4, 2, 3), (8, 4, 2), (8, 4, 3)):
        a, b = sc(a), sc(b)
        add(f"first {a} + every {s} of {a}-{L - b - 1} + last {b}",
            [*range(a), *range(a, L - b, s), *range(L - b, L)])
    for a, b in ((8, 6), (12, 6), (14, 8), (12, 12), (16, 10)):
        a, b = sc(a), sc(b)
        add(f"drop {a}-{L - b - 1}", [*range(a), *range(L - b, L)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("tools.layerskip_search", "Find the best LayerSkipDraft subset and k.")
    p.add_argument("--top", type=int, help="candidates timed again in phase 2 (default 4; 3 quick, 2 smoke)")
    p.add_argument("--ks", type=int, nargs="+", default=[2, 3, 4], help="draft lengths k")
    args = p.parse_args(argv)
    dev = H.setup(args)
    import decodekit

    spec = "random:tiny" if args.smoke else (args.model or ["embedded"])[0]
    wl = load_workload(spec, dev, args.dtype or "fp32")  # fp32 also on CUDA: greedy ties stay exact
    n = H.check_tokens(args.max_new_tokens or (12 if args.smoke else 48))
    top_n = args.top or (2 if args.smoke else 3 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick or args.smoke else 2)
    prompts = wl.encode_all(prompt_set("speculative_prompts")["search"])
    seq, L = H.max_seq(prompts, n), wl.model.config.num_hidden_layers
    side = lambda layers=None, k=0: dk_side(
        make_gen(wl, 1, seq, layers and decodekit.LayerSkipDraft(layers, k=k)), 0.0, dev)
    serial = lambda s, ps: [s([q], [1000 + i], n) for i, q in enumerate(ps)]
    total = lambda runs: functools.reduce(Run.add, runs, Run())
    plain = side()
    serial(plain, prompts[:1])  # warm-up
    before = total(serial(plain, prompts[:2]))
    entries: list[dict[str, Any]] = []
    for desc, keep in candidates(L):
        group = []
        for k in args.ks:
            e: dict[str, Any] = {"subset": desc, "layers": keep, "k": k, "status": "ok"}
            try:
                r = total(serial(side(keep, k), prompts[:2]))
                e.update(tok_s=r.tok_s, drafted=r.drafted, accepted=r.accepted,
                         acceptance_rate=r.accepted / r.drafted if r.drafted else None,
                         greedy_mismatches=sum(a != b for a, b in zip(r.tokens, before.tokens, strict=True)))
            except Exception as exc:
                e.update(status=H.short_error(exc), tok_s=None)
            group.append(e)
        after = total(serial(plain, prompts[:2]))
        local = ((before.tok_s or 0) + (after.tok_s or 0)) / 2
        for e in group:
            e["speedup_est"] = e["tok_s"] / local if e["tok_s"] and local else None
            print(f"{desc} ({len(keep)} layers) k={e['k']}: accept {H.f(e.get('acceptance_rate'), '{:.0%}')}"
                  f", est. {H.ratio(e['speedup_est'])}, {e['status']}", flush=True)
        entries += group
        before = after
    ranked = sorted((e for e in entries if e["speedup_est"]), key=lambda e: (not e.get("accepted"),
                                                                               -e["speedup_est"]))
    top = ranked[:top_n]
    sides = {i: side(e["layers"], e["k"]) for i, e in enumerate(top)}
    runs: dict[Any, list[Run]] = {i: [] for i in [None, *sides]}
    for rep in range(repeats):
        order = [None, *sides] if rep % 2 == 0 else [*sides, None][::-1]
        for i in order:
            runs[i].append(total(serial(plain if i is None else sides[i], prompts)))
    base = H.median([r.tok_s or 0 for r in runs[None]])
    for i, e in enumerate(top):
        e["timed_speedup"] = H.median([r.tok_s or 0 for r in runs[i]]) / base if base else None
        e["greedy_mismatches"] += sum(a != b for x, y in zip(runs[None], runs[i], strict=True)
                                      for a, b in zip(x.tokens, y.tokens, strict=True))
    best = max(top, key=lambda e: e["timed_speedup"] or 0)
    keep = best["layers"]  # "N": the first N layers; a list has a comma ("5,")
    layers = ",".join(map(str, keep)) + ("," if len(keep) == 1 else "")
    layers = str(len(keep)) if keep == list(range(len(keep))) else layers
    flags = f"--layerskip-layers {layers} --layerskip-k {best['k']}"
    meta = H.metadata(dev, "time.perf_counter wall time of the decode calls after prefill",
                      model=wl.description, n_layers=L, max_new_tokens=n, ks=args.ks, top=top_n,
                      repeats=repeats, best=best, best_flags=flags, smoke=args.smoke)
    body = [f"- {wl.description}, {L} layers, greedy, B=1, {n} new tokens; {len(entries)} candidates; "
            f"plain {H.f(base)} tok/s in phase 2", f"- best: {best['subset']}, k={best['k']}, timed "
            f"{H.ratio(best['timed_speedup'])}: `python -m bench.speculative {flags}`", "",
            H.table(["subset", "layers", "k", "accept", "est. speedup", "timed speedup", "greedy mismatches",
                     "status"],
                    [[e["subset"], len(e["layers"]), e["k"], H.f(e.get("acceptance_rate"), "{:.0%}"),
                      H.ratio(e["speedup_est"]), H.ratio(e.get("timed_speedup")),
                      e.get("greedy_mismatches", "-"), e["status"]]
                     for e in sorted(entries, key=lambda e: -(e["speedup_est"] or 0))])]
    H.report("layerskip-search", "LayerSkip subset search", args, meta, entries, body)
    print(f"best: {flags}")
    return 1 if any(e.get("greedy_mismatches") for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
