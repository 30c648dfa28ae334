"""Effect of each steering preset on the embedded SmolLM2-135M-Instruct: mean generated
length and the preset's score (``tests/_preset_scores.py``) over 20 open-ended prompts,
seeded sampling (temperature 0.5, top-p 0.9, 80 new tokens), without steering, with the
preset at its default strength and at minus that strength. Same settings as the slow tests
in ``tests/test_steer_presets.py``.

Usage::

    python -m bench.steering_presets [--threads N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    import _preset_scores as S
    from test_steer_presets import OPEN_PROMPTS, _readable, _texts

    from decodekit import LLM, load
    from decodekit.steer_presets import PRESETS

    from ._util import metadata

    model, tok = load()
    llm = LLM(model=model, tokenizer=tok, max_batch_size=10, max_seq_len=512)
    scores = {"length": lambda t: float(len(S.words(t))), "sentiment": S.sentiment_score,
              "formality": S.formality_score}
    rows = []
    t0 = time.perf_counter()
    runs = [("none", None, None)] + [(n, n, s) for n in PRESETS for s in (None, "neg")]
    for label, preset, sign in runs:
        kw = {}
        if preset is not None:
            kw["steering_preset"] = preset
            if sign == "neg":
                kw["steering_strength"] = -PRESETS[preset].default_strength
        outs = _texts(llm, **kw)
        strength = None if preset is None else (PRESETS[preset].default_strength * (-1 if sign else 1))
        row = {"preset": label, "strength": strength,
               "mean_tokens": sum(len(o.token_ids) for o in outs) / len(outs),
               "readable": sum(_readable(o.text) for o in outs) / len(outs),
               **{k: sum(f(o.text) for o in outs) / len(outs) for k, f in scores.items()},
               "sample": outs[0].text[:160]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    meta = metadata(torch.device("cpu"), prompts=len(OPEN_PROMPTS), seconds=seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steering-presets-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Steering presets on SmolLM2-135M-Instruct (CPU)", "",
             f"- command: `{meta['command']}`",
             f"- {meta['device']}; torch {meta['torch']}, transformers {meta['transformers']}, "
             f"python {meta['python']}; {meta['cpu_threads']} threads; load average {meta['load_avg_1m']}",
             "- 20 open-ended chat prompts, seeded sampling (t=0.5, top-p 0.9), 80 new tokens, batch 10", "",
             "| preset | strength | mean tokens | sentiment | formality | readable |",
             "| :-- | --: | --: | --: | --: | --: |"]
    for r in rows:
        s = "-" if r["strength"] is None else f"{r['strength']:+.2f}"
        lines.append(f"| {r['preset']} | {s} | {r['mean_tokens']:.1f} | {r['sentiment']:+.4f} | "
                     f"{r['formality']:+.4f} | {r['readable']:.0%} |")
    (out / "steering-presets-cpu.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
