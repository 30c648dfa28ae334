"""Guided-decoding benchmark: the per-step cost of structured output against unguided decoding
of the same batch in the same run, at several batch sizes: decode ms per step, the sampling
section of it (bitmask fill by xgrammar's matchers, upload, masked sampling, accepting the
tokens), and the bitmask fill alone. Grammars that cannot end within the measured steps keep
the batch full: a long regex and a JSON schema with a long array.

Usage: ``python -m bench.guided [--batch B..] [common flags, see --help]``
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload


def specs(smoke: bool) -> dict[str, Any]:
    """The guided sides: name -> GuidedDecodingParams."""
    import decodekit

    if smoke:  # the word tokenizer spells w<digits>
        return {"regex": decodekit.GuidedDecodingParams(regex="[w0-9]{40,400}")}
    return {"regex": decodekit.GuidedDecodingParams(regex="[a-z ,.]{300,600}"),
            "json": decodekit.GuidedDecodingParams(json={
                "type": "object", "required": ["items"],
                "properties": {"items": {"type": "array", "minItems": 60,
                                         "items": {"type": "string", "maxLength": 12}}}})}


def side(wl: Workload, batch: int, spec: Any, n: int, repeats: int, dev: torch.device) -> dict[str, Any]:
    """Median decode ms per step and sampling ms per step of ``batch`` requests (``spec``: None
    for unguided), and the median bitmask fill of the batch (guided only)."""
    import decodekit

    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=1024, seed=0)
    prompts = [wl.encode(chat_prompts()[i % len(chat_prompts())]) for i in range(batch)]
    params = decodekit.SamplingParams(temperature=0.8, seed=1, max_new_tokens=n + 2, ignore_eos=True,
                                      guided_decoding=spec)
    step_ms, sample_ms, fill_us = [], [], []
    for r in range(repeats):
        ctxs = [gen.new_context(p, params.replace(seed=r * batch + i)) for i, p in enumerate(prompts)]
        batch_map = {c.request_id: c for c in ctxs}
        gen.next_token(batch_map, num_steps=1)  # prefill
        wall, _ = H.timed_call(lambda: gen.next_token(batch_map, num_steps=n), dev)  # noqa: B023
        step_ms.append(wall * 1e3 / n)
        sample_ms.append(gen.stats.sample_s * 1e3 / n)
        if spec is not None:
            fill_us.append(H.mask_fill_us(gen, ctxs))
        for c in ctxs:
            gen.release(c)
    if any(len(c.generated_token_ids) < n + 1 for c in ctxs):
        raise RuntimeError("a guided request ended inside the measured steps: the batch shrank")
    return {"step_ms": H.median(step_ms), "sample_ms": H.median(sample_ms),
            "fill_us": H.median(fill_us) if fill_us else None}


JUMP_SCHEMA = {"type": "object", "required": ["customer_full_name", "customer_email_address", "order_status"],
               "properties": {"customer_full_name": {"type": "string", "maxLength": 24},
                              "customer_email_address": {"type": "string", "maxLength": 32},
                              "order_status": {"enum": ["shipped", "pending", "cancelled"]}}}


def jump_forward(wl: Workload, batch: int, dev: torch.device, smoke: bool) -> dict[str, Any]:
    """Steps and wall time for ``batch`` greedy JSON requests whose keys the grammar forces:
    plain guided decoding vs jump-forward (an n-gram drafter on, so forced text enters as
    drafts); the outputs must be identical."""
    import decodekit

    spec = (decodekit.GuidedDecodingParams(regex="w5w6w7w8w9w3w4w5w6w7w8w9[w3-9]{1,8}") if smoke else
            decodekit.GuidedDecodingParams(json=JUMP_SCHEMA, disable_any_whitespace=True))
    prompt = [{"role": "user", "content": "Give one customer order as JSON."}]
    out = {}
    for name, draft in (("plain", None), ("jump-forward", decodekit.NGramDraft(k=8))):
        gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=512, seed=0,
                                       draft=draft, adaptive_k=False)
        params = decodekit.SamplingParams(temperature=0.0, max_new_tokens=96, guided_decoding=spec)
        ctxs = [gen.new_context(prompt if not smoke else [5, 6, 7], params) for _ in range(batch)]
        steps = forced = 0
        t0 = time.perf_counter()
        while any(not c.is_done for c in ctxs):
            gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=4)
            steps, forced = steps + gen.stats.steps, forced + gen.stats.forced_tokens
        out[name] = {"steps": steps, "forced": forced, "wall_s": time.perf_counter() - t0,
                     "tokens": sum(len(c.generated_token_ids) for c in ctxs),
                     "outputs": [c.generated_token_ids for c in ctxs]}
    plain, jf = out["plain"], out["jump-forward"]
    return {"batch": batch, "plain_steps": plain["steps"], "jf_steps": jf["steps"],
            "forced_tokens": jf["forced"], "tokens": jf["tokens"], "plain_s": plain["wall_s"],
            "jf_s": jf["wall_s"], "identical": plain["outputs"] == jf["outputs"]}


def _cells(r: dict[str, Any]) -> list[Any]:
    if r["status"] != "ok":
        return [r["batch"], r["grammar"], r["status"], "", "", "", "", ""]
    return [r["batch"], r["grammar"], H.f(r["plain_step_ms"], "{:.2f}"), H.f(r["guided_step_ms"], "{:.2f}"),
            H.ratio(r["ratio"]), H.f(r["overhead_ms_per_token"], "{:.3f}"),
            f"{r['plain_sample_ms']:.2f} -> {r['guided_sample_ms']:.2f}", H.f(r["fill_us"])]


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.guided", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes (1 8 32)")
    args = p.parse_args(argv)
    dev, smoke = H.setup(args), args.smoke
    wl = load_workload("random:tiny" if smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    batches = args.batch or ([2] if smoke else [1, 4] if args.quick else [1, 8, 32])
    n = H.check_tokens(args.max_new_tokens or (4 if smoke else 16))
    repeats = args.repeats or (1 if smoke else 3)
    rows = []
    for b in batches:
        base = side(wl, b, None, n, repeats, dev)
        for name, spec in specs(smoke).items():
            t0 = time.perf_counter()
            try:
                g = side(wl, b, spec, n, repeats, dev)
                row = {"batch": b, "grammar": name, "status": "ok", "plain_step_ms": base["step_ms"],
                       "guided_step_ms": g["step_ms"], "plain_sample_ms": base["sample_ms"],
                       "guided_sample_ms": g["sample_ms"], "fill_us": g["fill_us"]}
                row["overhead_ms_per_token"] = (g["step_ms"] - base["step_ms"]) / b
                row["ratio"] = base["step_ms"] / g["step_ms"]
            except Exception as exc:  # noqa: BLE001 - a side failing is a result
                row = {"batch": b, "grammar": name, "status": H.short_error(exc)}
            row["wall_s"] = time.perf_counter() - t0
            print(row, flush=True)
            rows.append(row)
            gc.collect()
    jf = jump_forward(wl, 2 if smoke else 4, dev, smoke)
    print(jf, flush=True)
    meta = H.metadata(dev, "wall time (time.perf_counter, device synchronised) of next_token(num_steps=N) "
                      "/ N, median over repeats; sampling section from gen.stats.sample_s; bitmask fill: "
                      "median of 5 fills of the batch", model=f"{wl.description}, {wl.dtype_name}",
                      steps=n, repeats=repeats, specs={k: str(v) for k, v in specs(smoke).items()},
                      jump_forward=jf)
    body = [f"- B requests (chat prompts), temperature 0.8, {n} decode steps timed after the prefill; "
            "grammars that cannot end inside them (the batch stays full)",
            "", H.table(["B", "grammar", "unguided ms/step", "guided ms/step", "unguided / guided",
                         "overhead ms/token", "sampling ms/step (unguided -> guided)",
                         "bitmask fill us (batch)"], [_cells(r) for r in rows]), "",
            f"Jump-forward ({jf['batch']} greedy requests, a JSON schema with long keys, no whitespace): "
            f"{jf['plain_steps']} steps plain vs {jf['jf_steps']} with forced text as drafts "
            f"({jf['forced_tokens']} of {jf['tokens']} tokens forced; wall {jf['plain_s']:.2f} s vs "
            f"{jf['jf_s']:.2f} s; outputs identical: {jf['identical']})."]
    H.report("guided", "Guided-decoding benchmark", args, meta, rows, body)
    return 0 if all(r["status"] == "ok" for r in rows) and jf["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
