"""Verification benchmark: the host + sampler time of one speculative window, ``logits [R, W, V]``
with point-mass drafts (prompt lookup), per sampling setting: the full path (every window
position's processed distribution, then the verify rule), the point-mass path (only the drafts'
probabilities, one distribution per request) and the greedy path (argmax, greedy rows only), next
to the floor (one read of the window's logits at the measured copy bandwidth). Method:
bench/README.md.

Usage: ``python -m bench.verify [--quick] [--rows R..] [--widths W..] [--vocab V] [--settings ..]
[--dist peaked|flat] [--device D] [--threads N] [--out DIR]``
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _harness as H
from .sampler import SETTINGS, bias_map, make_logits

IMPLS = ("full", "point", "greedy")
NAMES = {"full": "window_probs + verify ms", "point": "verify_point_masses ms", "greedy": "verify_greedy ms"}


def make_window(setting: str, dist: str, rows: int, width: int, vocab: int, dev: torch.device,
                drafts_kind: str = "thirds"
                ) -> tuple[Any, list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampler with ``rows`` requests of ``setting`` and a window: ``(sampler, slots, logits
    [R, W, V], drafts [R, W - 1], n_draft [R])``. Drafts are each position's argmax (``argmax``:
    a copy running through the window, sampled rows still reject now and then) or that except
    every third token (``thirds``: runs of two ended by a rejection)."""
    from decodekit import Sampler, SamplingParams

    st = SETTINGS[setting]
    params = SamplingParams(**st.params, **({"logit_bias": bias_map(vocab)} if st.history else {}))
    s = Sampler(vocab, rows, dev, seed=0)
    gen = torch.Generator().manual_seed(1)
    for r in range(rows):
        prompt = torch.randint(0, vocab, (256,), generator=gen) if st.history else None
        s.add(r, params.replace(seed=1000 + r), prompt)
    logits = make_logits(dist, rows * width, vocab, torch.float32, dev).view(rows, width, vocab)
    drafts = logits[:, : width - 1].argmax(-1)
    other = torch.randint(0, vocab, drafts.shape, generator=gen).to(dev)
    if drafts_kind == "thirds":
        drafts = torch.where(torch.arange(width - 1, device=dev) % 3 == 2, other, drafts)
    return s, list(range(rows)), logits, drafts, torch.full((rows,), width - 1, device=dev)


def impl_fn(impl: str, s: Any, slots: list[int], logits: torch.Tensor, drafts: torch.Tensor,
            n_draft: torch.Tensor) -> Callable[[], Any] | None:
    """One verification as the speculative step runs it (nothing committed), or None when the
    path does not apply (the point-mass path on the Triton backend, the greedy path on sampled
    rows)."""
    if impl == "full":
        return lambda: s.verify(s.window_probs(logits, slots, drafts), None, drafts, n_draft,
                                slots)[0].tolist()
    if impl == "point":
        if s.verify_point_masses(logits, slots, drafts, n_draft) is None:
            return None
        return lambda: s.verify_point_masses(logits, slots, drafts, n_draft)[0].tolist()
    if s.verify_greedy(logits, slots, drafts, n_draft) is None:
        return None
    return lambda: s.verify_greedy(logits, slots, drafts, n_draft)[0].tolist()


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.verify", "Time one speculative window's verification: every position's "
                 "distribution vs the drafts' probabilities only, against the memory floor.", models=False)
    p.add_argument("--rows", type=int, nargs="+", metavar="R", help="requests per window (default 1 8)")
    p.add_argument("--widths", type=int, nargs="+", metavar="W",
                   help="window positions, drafts + 1 (default 5 11 17)")
    p.add_argument("--vocab", type=int, default=49152, help="V (default 49152, SmolLM2's)")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--dist", choices=("peaked", "flat"), default="peaked")
    p.add_argument("--drafts", nargs="+", choices=("thirds", "argmax"), default=["thirds", "argmax"],
                   help="draft patterns (default both): every third token wrong / every position's argmax")
    args = p.parse_args(argv)
    dev = H.setup(args)
    rows_list = args.rows or [1, 8]
    widths = args.widths or ([11] if args.quick else [5, 11, 17])
    settings = args.settings or list(SETTINGS)
    timing = H.Timing(warmup=1, repeats=5 if args.quick else 15)
    bw = H.measure_bandwidth(dev, quick=args.quick)
    meta = H.metadata(dev, timing.method(dev),
                      copy_bandwidth={"bytes_per_s": bw.bytes_per_s, "method": bw.method},
                      config={"rows": rows_list, "widths": widths, "vocab": args.vocab,
                              "settings": settings, "dist": args.dist, "quick": args.quick},
                      settings={k: SETTINGS[k].description for k in settings})
    out: list[dict[str, Any]] = []
    for name, kind in [(n, k) for n in settings for k in args.drafts]:
        for R in rows_list:
            for W in widths:
                s, slots, logits, drafts, nd = make_window(name, args.dist, R, W, args.vocab, dev, kind)
                fns = {k: impl_fn(k, s, slots, logits, drafts, nd) for k in IMPLS}
                ref = fns["full"]()
                same = {k: fn() == ref for k, fn in fns.items() if fn is not None}
                ms = {k: None if fn is None else H.bench_ms(fn, dev, timing) for k, fn in fns.items()}
                floor = bw.floor_ms(R * W * args.vocab * 4)
                best = min(v for v in ms.values() if v is not None)
                row = {"setting": name, "drafts": kind, "rows": R, "width": W, "vocab": args.vocab, "ms": ms,
                       "same_tokens": same, "floor_ms": floor, "speedup": ms["full"] / best,
                       "best_over_floor": best / floor}
                out.append(row)
                print(f"{name:<9} {kind:<6} R={R} W={W:<3} floor {floor:.3f} ms | " + " | ".join(
                    f"{k} {H.f(v, '{:.2f}')}" for k, v in ms.items()) + f" | same {same}", flush=True)
    body = [
        f"- logits: {args.dist} (bench/sampler.py's make_logits), V={args.vocab}, fp32; drafts: each "
        "position's argmax (argmax) or that except every third token (thirds: a run of two, then a "
        "rejection)",
        f"- floor: one read of the window's logits (R*W*V*4 bytes) at {bw.bytes_per_s / 1e9:.1f} GB/s "
        f"({bw.method}); x floor = best time / floor",
        "- every path's tokens are checked equal to the full path's (same tokens column)",
        "- speedup: full path time / best applicable path time", "",
        H.table(["setting", "drafts", "R", "W", "floor ms", *[NAMES[k] for k in IMPLS], "speedup", "x floor",
                 "same tokens"],
                [[r["setting"], r["drafts"], r["rows"], r["width"], H.f(r["floor_ms"], "{:.3f}"),
                  *[H.f(r["ms"][k], "{:.2f}") if r["ms"][k] is not None else "n/a" for k in IMPLS],
                  H.ratio(r["speedup"]), H.f(r["best_over_floor"]),
                  "yes" if all(r["same_tokens"].values()) else "NO"] for r in out]),
    ]
    H.report("verify", "Speculative verification benchmark", args, meta, out, body)
    return 0 if all(all(r["same_tokens"].values()) for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
