"""cProfile of batch-1 decode steps of :class:`~decodekit.TokenGenerator`: the step time split
into model forward, masks, cache bind, sampler, EOS/detokenisation and the rest (inputs, glue),
plus the top functions by own time. cProfile inflates Python-heavy parts.

Usage: ``python -m tools.profile_step [--model M] [--max-new-tokens N] [--sampled]``
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from collections.abc import Sequence

from bench import _harness as H
from bench._models import chat_prompts, load_workload


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("tools.profile_step", "cProfile batch-1 decode steps.")
    p.add_argument("--sampled", action="store_true", help="top_p 0.9, t=0.8 instead of greedy")
    p.add_argument("--top", type=int, default=15, help="functions listed")
    args = p.parse_args(argv)
    dev = H.setup(args)
    from decodekit import SamplingParams, TokenGenerator

    wl = load_workload("random:tiny" if args.smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    n = args.max_new_tokens or 32
    prompt = wl.encode(chat_prompts()[0])
    gen = TokenGenerator(wl.model, wl.tokenizer, max_batch_size=1, max_seq_len=H.max_seq([prompt], n + 2))
    sp = SamplingParams(max_new_tokens=n + 2, ignore_eos=True, seed=0,
                        **({"temperature": 0.8, "top_p": 0.9} if args.sampled else {"temperature": 0.0}))
    ctx = gen.new_context(prompt, sp)
    batch = {ctx.request_id: ctx}
    gen.next_token(batch)  # prefill
    gen.next_token(batch)  # one unprofiled step
    prof, steps, t0 = cProfile.Profile(), 0, time.perf_counter()
    with prof:
        while not ctx.is_done:
            gen.next_token(batch)
            steps += 1
    wall = (time.perf_counter() - t0) / steps * 1e6
    gen.release(ctx)
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    cum = {k: sum(v[3] for (f, _, fn), v in st.items()
                  if fn == name and f.replace(os.sep, "/").endswith(suffix)) / steps * 1e6
           for k, (suffix, name) in H.PROFILE_PARTS.items()}
    parts = {"model forward": cum["forward_section"] - cum["masks"] - cum["cache_bind"],
             "masks": cum["masks"], "cache bind": cum["cache_bind"], "sampler": cum["sampler"],
             "eos/detok": cum["eos_detok"], "inputs + glue": cum["next_token"] - cum["forward_section"]
             - cum["sampler"] - cum["eos_detok"]}
    print(f"{wl.description}: {steps} decode steps, {wall:,.0f} us/step under the profiler")
    print(H.table(["part", "us/step"], [[k, f"{v:,.0f}"] for k, v in parts.items()]))
    top = sorted(st.items(), key=lambda kv: -kv[1][2])[: args.top]
    print(H.table(["function", "calls/step", "own us/step", "cum us/step"],
                  [[f"{os.path.basename(f)}:{line}({fn})", f"{v[1] / steps:.1f}",
                    f"{v[2] / steps * 1e6:,.0f}", f"{v[3] / steps * 1e6:,.0f}"] for (f, line, fn), v in top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
