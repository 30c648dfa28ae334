"""Samples benchmark: ``n`` samples of one prompt (``SamplingParams(n=...)``: one prefill, the
request forked) against ``n`` independent requests seeded like the samples, on the same
generator settings, in the same run. Reports wall time, prompt tokens computed, tokens/s and
the ratio; the samples must equal their independent twins token for token.

Usage: ``python -m bench.samples [--n N] [--prompt-tokens P] [common flags, see --help]``
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload


def long_prompt(wl: Workload, tokens: int) -> list[int]:
    """A prompt of ``tokens`` tokens: chat questions one after another."""
    ids: list[int] = []
    while len(ids) < tokens:
        for t in chat_prompts():
            ids += wl.encode(t)
    return ids[:tokens]


def run_side(wl: Workload, prompt: list[int], n: int, new: int, forked: bool, dev: torch.device
             ) -> dict[str, Any]:
    """One timed pass: the ``n`` samples of ``prompt`` (``forked``) or ``n`` seeded requests."""
    import decodekit
    from decodekit.engine.scheduler import continuous_batching

    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=n,
                                   max_seq_len=len(prompt) + new + 1, seed=0)
    params = decodekit.SamplingParams(temperature=0.8, top_p=0.95, seed=1000, max_new_tokens=new,
                                      ignore_eos=True)
    if forked:
        ctxs = gen.new_contexts(prompt, params.replace(n=n))
    else:
        ctxs = [gen.new_context(prompt, params.replace(seed=1000 + i)) for i in range(n)]
    computed = 0

    def loop() -> None:
        nonlocal computed
        for _ in continuous_batching(gen, ctxs):
            computed += gen.stats.prefill_tokens

    wall, _ = H.timed_call(loop, dev)
    tokens = sum(len(c.generated_token_ids) for c in ctxs)
    return {"wall_s": wall, "tokens": tokens, "prefill_computed": computed,
            "outputs": [c.generated_token_ids for c in ctxs]}


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.samples", __doc__.splitlines()[0])
    p.add_argument("--n", type=int, help="samples of the prompt (8)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (400)")
    args = p.parse_args(argv)
    dev, smoke = H.setup(args), args.smoke
    n = args.n or (3 if smoke else 8)
    P = args.prompt_tokens or (30 if smoke else 400)
    new = H.check_tokens(args.max_new_tokens or (4 if smoke else 16 if args.quick else 48))
    repeats = args.repeats or (1 if smoke or args.quick else 3)
    wl = load_workload("random:tiny" if smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    prompt = long_prompt(wl, P)
    sides = {f"n={n} samples (one prefill)": True, f"{n} independent requests": False}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for _ in range(repeats):  # sides interleaved
        for name, forked in sides.items():
            try:
                runs[name].append(run_side(wl, prompt, n, new, forked, dev))
            except Exception as exc:  # noqa: BLE001 - a side failing is a result, not a crash
                runs[name].append({"status": H.short_error(exc)})
            gc.collect()
    rows = []
    for name, rs in runs.items():
        ok = [r for r in rs if "status" not in r]
        row: dict[str, Any] = {"side": name, "status": "ok" if ok else rs[-1]["status"]}
        if ok:
            row.update({k: v for k, v in ok[-1].items() if k != "outputs"})
            row["wall_s"] = H.median([r["wall_s"] for r in ok])
            row["tok_s"] = row["tokens"] / row["wall_s"]
        rows.append(row)
    outs = [runs[k][-1].get("outputs") for k in sides]
    same = None if None in outs else sum(a == b for a, b in zip(*outs, strict=True)) / n
    for r in rows:
        r["ratio"] = rows[0]["tok_s"] / r["tok_s"] if r.get("tok_s") and rows[0].get("tok_s") else None
        r["identical"] = same
        print(r, flush=True)
    meta = H.metadata(dev, "wall time (time.perf_counter, device synchronised) of the whole serving loop, "
                      "median over repeats, sides interleaved", model=f"{wl.description}, {wl.dtype_name}",
                      n=n, prompt_tokens=P, max_new_tokens=new, repeats=repeats)
    body = [f"- one {P}-token prompt, {n} samples of {new} tokens (temperature 0.8, top-p 0.95, ignore EOS); "
            f"sample i and independent request i are both seeded 1000 + i", "",
            H.table(["side", "wall s", "tok/s", "samples / side", "prompt tokens computed"],
                    [[r["side"], H.f(r.get("wall_s"), "{:.2f}"), H.f(r.get("tok_s")), H.ratio(r.get("ratio")),
                      H.f(r.get("prefill_computed"), "{:,.0f}")] if r["status"] == "ok"
                     else [r["side"], r["status"], "", "", ""] for r in rows]),
            "", f"Samples equal to their independent twins: {H.f(same, '{:.0%}')}."]
    H.report("samples", "Samples benchmark", args, meta, rows, body)
    return 0 if all(r["status"] == "ok" for r in rows) and same == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
