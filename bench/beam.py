"""Beam search benchmark: ``TokenGenerator.beam_search`` (k beams = k KV-cache slots, forked caches)
against transformers' ``generate(num_beams=k, disable_compile=True)`` on the same chat prompts, one
prompt per search, sides interleaved per repeat (the order flips). Reports output tokens/s (the
new tokens of each search's best sequence / wall time), ms per search, the ratio, and whether
every returned sequence equals transformers'. Method: bench/README.md.

Usage: ``python -m bench.beam [--beams K] [--prompts P] [common flags, see --help]``
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload


def run_dk(gen: Any, prompts: list[list[int]], params: Any, dev: torch.device) -> tuple[float, list]:
    """Wall seconds of one search per prompt, and each search's sequences (best first)."""
    wall, outs = H.timed_call(lambda: [gen.beam_search([p], params)[0] for p in prompts], dev)
    return wall, [[s.token_ids for s in o.sequences] for o in outs]


def run_hf(wl: Workload, prompts: list[list[int]], k: int, n: int, eos: list[int], dev: torch.device
           ) -> tuple[float, list]:
    """The same with ``model.generate``; a shorter sequence's padding is cut at its length
    (``beam_indices``)."""
    def one(p: list[int]) -> list[list[int]]:
        ids = torch.tensor([p], device=dev)
        out = wl.model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                                do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=wl.pad_id,
                                return_dict_in_generate=True, output_scores=True, disable_compile=True)
        lengths = (out.beam_indices != -1).sum(1).tolist()
        return [out.sequences[j, len(p):len(p) + lengths[j]].tolist() for j in range(k)]
    return H.timed_call(lambda: [one(p) for p in prompts], dev)


def main(argv: Sequence[str] | None = None) -> int:
    from decodekit import TokenGenerator
    from decodekit.engine.beam import BeamSearchParams

    p = H.parser("bench.beam", "Beam search tokens/s: decodekit vs transformers generate(num_beams).")
    p.add_argument("--beams", type=int, default=4, help="beam width (4)")
    p.add_argument("--prompts", type=int, help="chat prompts, one search each (default 8; 2 quick/smoke)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    k, n_prompts = args.beams, args.prompts or (2 if args.smoke or args.quick else 8)
    n = H.check_tokens(args.max_new_tokens or (6 if args.smoke else 16 if args.quick else 64))
    args.repeats = args.repeats or (1 if args.smoke else 3)
    wl = load_workload("random:tiny" if args.smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    prompts = wl.encode_all(chat_prompts()[:n_prompts])
    gen = TokenGenerator(wl.model, wl.tokenizer, max_batch_size=k, max_seq_len=H.max_seq(prompts, n), seed=0)
    params = BeamSearchParams(beam_width=k, max_tokens=n)
    sides = {"decodekit beam_search": lambda: run_dk(gen, prompts, params, dev),
             "HF generate(num_beams)": lambda: run_hf(wl, prompts, k, n, gen.eos_token_ids, dev)}
    for fn in sides.values():  # warm-up
        fn()
    walls: dict[str, list[float]] = {s: [] for s in sides}
    seqs: dict[str, list] = {}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            wall, seqs[name] = sides[name]()
            walls[name].append(wall)
            print(f"repeat {r}: {name} {wall:.3f} s", flush=True)
    dk, hf = seqs["decodekit beam_search"], seqs["HF generate(num_beams)"]
    out_tokens = sum(len(s[0]) for s in dk)
    eos = set(gen.eos_token_ids)
    stopped = sum(bool(b) and b[-1] in eos for s in dk for b in s) / sum(len(s) for s in dk)
    same = sum(a == b for a, b in zip(dk, hf, strict=True)) / len(dk)
    rows = []
    for name, ws in walls.items():
        t = H.median(ws)
        rows.append({"side": name, "status": "ok", "wall_s": t, "wall_s_all": ws, "tok_s": out_tokens / t,
                     "ms_per_search": t * 1e3 / len(prompts), "beams": k, "prompts": len(prompts),
                     "max_new_tokens": n})
    for r in rows:
        r["dk_over_side"] = rows[0]["tok_s"] / r["tok_s"]
    print("\n".join(f"{r['side']}: {r['tok_s']:.1f} tok/s, {r['ms_per_search']:.0f} ms/search, "
                    f"decodekit / side {r['dk_over_side']:.2f}x" for r in rows))
    body = [f"- model {wl.description}, {wl.dtype_name}; beam width {k}, max {n} new tokens, length_penalty "
            f"1, early_stopping False; {len(prompts)} chat prompts, one search each (batch 1); "
            f"{args.repeats} repeats, sides interleaved (order flips), after one warm-up pass each", "",
            f"- tok/s = new tokens of each search's best sequence ({out_tokens} in all) / wall time; the "
            f"searches returned identical sequences on both sides: {same:.0%} of prompts; "
            f"{stopped:.0%} of returned beams ended on EOS", "",
            H.table(["side", "tok/s", "ms / search", "decodekit / side"],
                    [[r["side"], H.f(r["tok_s"]), H.f(r["ms_per_search"], "{:,.0f}"),
                      H.ratio(r["dk_over_side"])] for r in rows])]
    meta = H.metadata(dev, "wall time (time.perf_counter, device synchronised) of all searches of a side, "
                      "median over repeats", model=wl.description, dtype=wl.dtype_name, beams=k,
                      max_new_tokens=n, prompts=len(prompts), repeats=args.repeats, smoke=args.smoke,
                      identical=same, eos_fraction=stopped)
    H.report("beam", "Beam search benchmark", args, meta, rows, body)
    if same < 1.0:
        print("warning: some sequences differ from transformers'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
