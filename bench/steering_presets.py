"""Effect of each steering preset on the embedded SmolLM2-135M-Instruct: mean generated length and
the preset scores (``tests/_preset_scores.py``) over the 20 open prompts of
``tests/test_steer_presets.py`` (seeded sampling, t=0.5, top-p 0.9, 80 new tokens, batch 10),
without steering, at each preset's default strength and at minus that strength.

Usage: ``python -m bench.steering_presets [--quick (4 prompts)] [--threads N] [--out DIR]``
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import _harness as H

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main(argv: Sequence[str] | None = None) -> int:
    args = H.parser("bench.steering_presets", __doc__.splitlines()[0], models=False).parse_args(argv)
    dev = H.setup(args)
    sys.path.insert(0, str(TESTS))
    import _preset_scores as S
    from test_steer_presets import OPEN_PROMPTS, _readable, _texts

    from decodekit import LLM, load

    model, tok = load(device=dev)
    llm = LLM(model=model, tokenizer=tok, max_batch_size=10, max_seq_len=512)
    scores = {"length": lambda t: float(len(S.words(t))), "sentiment": S.sentiment_score,
              "formality": S.formality_score}
    presets = H.steering_presets()
    rows, t0, n_prompts = [], time.perf_counter(), 4 if args.quick else len(OPEN_PROMPTS)
    for name, strength in [("none", None)] + [(k, s * v) for k, v in presets.items() for s in (1, -1)]:
        kw = {} if strength is None else {"steering_preset": name, "steering_strength": strength}
        outs = _texts(llm, n_prompts, **kw)
        rows.append({"preset": name, "strength": strength,
                     "mean_tokens": sum(len(o.token_ids) for o in outs) / len(outs),
                     "readable": sum(_readable(o.text) for o in outs) / len(outs),
                     **{k: sum(f(o.text) for o in outs) / len(outs) for k, f in scores.items()},
                     "sample": outs[0].text[:160]})
        print(json.dumps(rows[-1]), flush=True)
    meta = H.metadata(dev, "none (effects, not times)", prompts=n_prompts, quick=args.quick,
                      seconds=round(time.perf_counter() - t0, 1))
    body = [f"- {n_prompts} open-ended chat prompts, seeded sampling (t=0.5, top-p 0.9), 80 new tokens, "
            "batch 10", "",
            H.table(["preset", "strength", "mean tokens", "sentiment", "formality", "readable"],
                    [[r["preset"], H.f(r["strength"], "{:+.2f}"), H.f(r["mean_tokens"]),
                      H.f(r["sentiment"], "{:+.4f}"), H.f(r["formality"], "{:+.4f}"),
                      H.f(r["readable"], "{:.0%}")]
                     for r in rows])]
    H.report("steering-presets", "Steering presets on SmolLM2-135M-Instruct", args, meta, rows, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
