"""Generate benchmark. Step points: decode tokens/s of decodekit's :class:`~decodekit.TokenGenerator`
(one ``next_token`` per step) against transformers' ``model.generate`` on the same model, prompts
and settings, with the model forward alone, the host overhead per step, the bandwidth achieved
and the floor. Serve points: ``LLM.generate`` against transformers' continuous batching
(``model.generate_batch``) on the same request mix. Method: bench/README.md.

Usage: ``python -m bench.generate [--quick] [--batch B..] [--settings greedy sampled]
[--requests R] [--no-serve] [--host] [--model M..] [common flags, see --help]``
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload


@dataclass(frozen=True)
class Setting:
    description: str
    dk: dict[str, Any]  # SamplingParams fields
    hf: dict[str, Any]  # GenerationConfig fields


SETTINGS = {
    "greedy": Setting("temperature 0 (argmax)", {"temperature": 0.0}, {"do_sample": False}),
    "sampled": Setting("top_p 0.9, temperature 0.8 (no top-k)", {"temperature": 0.8, "top_p": 0.9},
                       {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}),
}


def dk_params(setting: str, n: int, count: int) -> list[Any]:
    from decodekit import SamplingParams

    return [SamplingParams(max_new_tokens=n, ignore_eos=True, seed=1000 + i, **SETTINGS[setting].dk)
            for i in range(count)]


def hf_config(setting: str, n: int, pad_id: int) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                            pad_token_id=pad_id, disable_compile=True, **SETTINGS[setting].hf)


def hf_generate(wl: Workload, ids: torch.Tensor, mask: torch.Tensor, setting: str, n: int,
                dev: torch.device) -> tuple[float, list[float], torch.Tensor]:
    """``model.generate`` of exactly ``n`` tokens per row: (wall s, step intervals, new tokens).
    Steps are timed by a no-op StoppingCriteria stamping ``perf_counter`` once per token."""
    with H.step_clock(wl.model) as clock:
        wall, out = H.timed_call(lambda: wl.model.generate(
            input_ids=ids, attention_mask=mask, stopping_criteria=[clock],
            generation_config=hf_config(setting, n, wl.pad_id)), dev)
    new, stamps = out[:, ids.shape[1]:].cpu(), [t for t, _ in clock.stamps]
    if new.shape[1] != n or len(stamps) != n:
        raise RuntimeError(f"model.generate: {new.shape[1]} tokens, {len(stamps)} steps for {n}")
    return wall, [b - a for a, b in zip(stamps, stamps[1:], strict=False)], new


def left_pad(prompts: list[list[int]], pad: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts], device=dev)
    return ids, torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=dev)


def step_point(wl: Workload, gen: Any, setting: str, batch: int, n: int, repeats: int,
               dev: torch.device, bw: H.Bandwidth) -> dict[str, Any]:
    """One (model, setting, B): sides interleaved per repeat; the forward alone after each dk run."""
    all_prompts = wl.encode_all(chat_prompts())
    prompts = [all_prompts[i % len(all_prompts)] for i in range(batch)]
    ids, mask = left_pad(prompts, wl.pad_id, dev)
    params = dk_params(setting, n, batch)
    row: dict[str, Any] = {"section": "step", "model": wl.name, "dtype": wl.dtype_name,
                           "setting": setting, "batch": batch, "max_new_tokens": n,
                           "decode_tokens": batch * (n - 1), "status": "ok"}
    dk, hf_n, hf_1, fwd = [], [], [], {}
    try:
        H.timed_generate(gen, prompts, dk_params(setting, 4, batch), dev)  # warm-up, both sides
        hf_generate(wl, ids, mask, setting, 4, dev)
        for _ in range(repeats):
            dk.append(H.timed_generate(gen, prompts, params, dev, on_step=lambda: H.step_stats(gen)))
            for k in sorted({s[3] for s in dk[-1].per_step}):
                bind, fn = H.forward_alone(gen, batch, k)
                bind()
                fn()
                fwd.setdefault(k, []).append(H.bench_ms(fn, dev, H.Timing(10, 50, 0, 3)))
            hf_n.append(hf_generate(wl, ids, mask, setting, n, dev))
            hf_1.append(hf_generate(wl, ids, mask, setting, 1, dev)[0])
    except Exception as exc:
        row["status"] = H.short_error(exc)
        return row
    steps = n - 1
    dk_s = H.median([r.decode_s for r in dk])
    per = lambda i: H.median([sum(s[i] for s in r.per_step) / len(r.step_s) for r in dk]) * 1e3
    kv = Counter(s[3] for s in dk[-1].per_step)
    fwd_ms = sum(H.median(fwd[k]) * c for k, c in kv.items()) / sum(kv.values())
    hf_s = H.median([r[0] for r in hf_n]) - H.median(hf_1)
    ctx = sum(map(len, prompts)) / batch + n / 2  # mean KV positions read per row and step
    nbytes = wl.step_bytes(batch, ctx)
    d = {"prefill_ms": H.median([r.prefill_s for r in dk]) * 1e3, "tok_s": batch * steps / dk_s,
         "step_ms": dk_s / steps * 1e3,
         "step_ms_median": H.median([t for r in dk for t in r.step_s]) * 1e3,
         "stats_forward_ms": per(0), "stats_sample_ms": per(1), "stats_total_ms": per(2)}
    h = {"prefill_ms": H.median(hf_1) * 1e3, "tok_s": batch * steps / hf_s if hf_s > 0 else None,
         "step_ms": hf_s / steps * 1e3,
         "step_ms_median": H.median([t for r in hf_n for t in r[1]]) * 1e3}
    for side in (d, h):
        side["gb_s"] = H.gb_s(nbytes, side["step_ms"] / 1e3)
        side["overhead_us"] = (side["step_ms"] - fwd_ms) * 1e3
        side["overhead_us_median_step"] = (side["step_ms_median"] - fwd_ms) * 1e3
    floor_ms = bw.floor_ms(nbytes)
    row.update(decodekit=d, hf=h, forward_ms=fwd_ms, kv_lens={str(k): c for k, c in sorted(kv.items())},
               ratio=d["tok_s"] / h["tok_s"] if h["tok_s"] else None,
               ratio_median_step=h["step_ms_median"] / d["step_ms_median"],
               step_bytes=nbytes, floor_step_ms=floor_ms, floor_tok_s=batch / floor_ms * 1e3)
    if setting == "greedy":
        row["greedy_rows_identical"] = sum(
            a == b.tolist() for a, b in zip(dk[-1].tokens, hf_n[-1][2], strict=True)) / batch
    return row


def serve_point(wl: Workload, setting: str, requests: int, max_batch: int, n: int,
                repeats: int, dev: torch.device, bw: H.Bandwidth) -> dict[str, Any]:
    """``LLM.generate`` vs ``model.generate_batch`` on ``requests`` prompts of ``n`` tokens each."""
    import decodekit

    all_prompts = wl.encode_all(chat_prompts())
    prompts = [all_prompts[i % len(all_prompts)] for i in range(requests)]
    params = dk_params(setting, n, requests)
    cfg = hf_config(setting, n, wl.pad_id)
    # a paged cache as large as decodekit's (max_batch x max_seq_len positions)
    cb = H.cb_config(256, num_blocks=-(-max_batch * H.max_seq(prompts, n) // 256))
    row: dict[str, Any] = {"section": "serve", "model": wl.name, "setting": setting,
                           "requests": requests, "max_batch_size": max_batch, "max_new_tokens": n,
                           "status": "ok"}
    try:
        llm = decodekit.LLM(model=wl.model, tokenizer=wl.tokenizer, max_batch_size=max_batch,
                            max_seq_len=H.max_seq(prompts, n), seed=0)
        loop_s: list[float] = []

        def hf() -> list[list[int]]:
            out = list(wl.model.generate_batch(prompts, generation_config=cfg, persistent_manager=True,
                                               continuous_batching_config=cb).values())
            loop_s.append(max(o.lifespan[1] for o in out) - min(o.lifespan[0] for o in out))
            return [list(o.generated_tokens) for o in out]

        dk = lambda: [o.token_ids for o in llm.generate(prompts, params)]
        dk()
        hf()  # warm-up; HF keeps its manager (paged cache) for the timed calls
        runs = [(H.timed_call(dk, dev), H.timed_call(hf, dev)) for _ in range(repeats)]
    except Exception as exc:
        row["status"] = H.short_error(exc)
        return row
    finally:
        wl.model.destroy_cached_continuous_batching_manager()
    (_, dk_toks), (_, hf_toks) = runs[-1]
    # bytes of an ideal schedule: ceil(R / B) waves of N steps, each reading the weights + B KV caches
    ctx = sum(map(len, prompts)) / requests + n / 2
    nbytes = -(-requests // max_batch) * n * wl.step_bytes(max_batch, ctx)
    sides = {}
    for i, name in enumerate(("decodekit", "hf")):
        wall = H.median([r[i][0] for r in runs])
        toks = sum(map(len, runs[-1][i][1]))
        sides[name] = {"wall_s": wall, "tokens": toks, "tok_s": toks / wall, "gb_s": H.gb_s(nbytes, wall)}
    sides["hf"]["tok_s_in_loop"] = sides["hf"]["tokens"] / H.median(loop_s[1:])
    row.update(sides, ratio=sides["decodekit"]["tok_s"] / sides["hf"]["tok_s"], hf_num_blocks=cb.num_blocks,
               floor_tok_s=sides["decodekit"]["tokens"] / bw.floor_ms(nbytes) * 1e3)
    if setting == "greedy":
        row["greedy_rows_identical"] = sum(a == b for a, b in zip(dk_toks, hf_toks, strict=True)) / requests
    return row


def host_point(wl: Workload, setting: str, batch: int, dev: torch.device) -> dict[str, Any]:
    """Host time per decode step: the generator with its model forward replaced by a stub that
    returns fixed logits (no model work; the sampler, EOS tracking and detokenization run),
    one step per call and 32 per call, median of 9 calls. On a GPU: a step's Python and launches
    (eager: a decode graph's replay launch is not in it)."""
    import decodekit

    row = {"section": "host", "model": wl.name, "setting": setting, "batch": batch, "status": "ok"}
    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=1024, seed=0,
                                   cuda_graphs=False)  # a graph would replay the real forward
    ctxs = [gen.new_context(wl.encode_all(chat_prompts())[0][:64], p) for p in dk_params(setting, 900, batch)]
    calls = {c.request_id: c for c in ctxs}
    gen.next_token(calls)
    logits = torch.randn(batch, 1, gen.vocab_size, device=dev).to(gen.dtype)
    gen.adapter.forward = lambda ids, *a, keep=1, **k: logits[: ids.shape[0], -keep:]
    for steps in (1, 32):
        gen.next_token(calls, steps)  # warm-up
        times = [H.timed_call(lambda s=steps: gen.next_token(calls, s), dev)[0] / steps for _ in range(9)]
        row[f"host_us_{steps}"] = H.median(times) * 1e6
    return row


def line(r: dict[str, Any]) -> str:
    head = f"{r['section']} {r['model']} {r['setting']} " + (
        f"B={r['batch']}" if r["section"] != "serve" else f"R={r['requests']}/B={r['max_batch_size']}")
    if r["status"] != "ok":
        return f"{head} | {r['status']}"
    if r["section"] == "host":
        return (f"{head} | host us per step: one step per call {r['host_us_1']:.0f}, "
                f"32 per call {r['host_us_32']:.0f}")
    d, h = r["decodekit"], r["hf"]
    if r["section"] == "serve":
        return (f"{head} | LLM.generate {d['tok_s']:.1f} tok/s ({H.f(d['gb_s'])} GB/s) | generate_batch "
                f"{h['tok_s']:.1f} tok/s ({H.f(h['gb_s'])} GB/s; in its loop {h['tok_s_in_loop']:.1f}) | "
                f"ratio {H.ratio(r['ratio'])} | floor {r['floor_tok_s']:.0f} tok/s")
    return (f"{head} | decodekit {d['tok_s']:.1f} tok/s ({H.f(d['gb_s'])} GB/s) | HF "
            f"{H.f(h['tok_s'])} tok/s ({H.f(h['gb_s'])} GB/s) | ratio {H.ratio(r['ratio'])} "
            f"(median step {H.ratio(r['ratio_median_step'])}) | floor {r['floor_tok_s']:.0f} tok/s "
            f"| fwd {r['forward_ms']:.2f} ms | overhead/step dk {d['overhead_us']:.0f} us, "
            f"HF {h['overhead_us']:.0f} us")


def body(rows: list[dict[str, Any]], bw: H.Bandwidth) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    step = [r for r in ok if r["section"] == "step"]
    serve = [r for r in ok if r["section"] == "serve"]
    both = lambda s, a, b: f"{H.f(s[a], '{:.2f}')} / {H.f(s[b], '{:.2f}')}"
    out = [f"- floor: weights + KV read once per step at the copy bandwidth {bw.bytes_per_s / 1e9:.1f}"
           f" GB/s ({bw.method})", "", "Step points (decode tok/s, TokenGenerator vs model.generate):",
           "", H.table(
               ["model", "setting", "B", "N", "dk tok/s", "HF tok/s", "ratio", "ratio (median step)",
                "dk GB/s", "HF GB/s", "floor tok/s", "dk / HF prefill ms", "fwd ms",
                "dk step ms mean / median", "HF step ms mean / median", "dk overhead us mean / median",
                "HF overhead us mean / median"],
               [[r["model"], r["setting"], r["batch"], r["max_new_tokens"], H.f(r["decodekit"]["tok_s"]),
                 H.f(r["hf"]["tok_s"]), H.ratio(r["ratio"]), H.ratio(r["ratio_median_step"]),
                 H.f(r["decodekit"]["gb_s"]), H.f(r["hf"]["gb_s"]), H.f(r["floor_tok_s"], "{:,.0f}"),
                 f"{r['decodekit']['prefill_ms']:.0f} / {r['hf']['prefill_ms']:.0f}",
                 H.f(r["forward_ms"], "{:.2f}"), both(r["decodekit"], "step_ms", "step_ms_median"),
                 both(r["hf"], "step_ms", "step_ms_median"),
                 both(r["decodekit"], "overhead_us", "overhead_us_median_step"),
                 both(r["hf"], "overhead_us", "overhead_us_median_step")] for r in step]),
           "", "decodekit step split (ms per decode step, from `gen.stats`):", "", H.table(
               ["model", "setting", "B", "step", "fwd section", "fwd alone", "sampler", "other"],
               [[r["model"], r["setting"], r["batch"], *[H.f(x, "{:.3f}") for x in (
                   r["decodekit"]["step_ms"], r["decodekit"]["stats_forward_ms"], r["forward_ms"],
                   r["decodekit"]["stats_sample_ms"], r["decodekit"]["stats_total_ms"]
                   - r["decodekit"]["stats_forward_ms"] - r["decodekit"]["stats_sample_ms"])]]
                for r in step])]
    if serve:
        out += ["", "Serve points (end-to-end tok/s, LLM.generate vs model.generate_batch):", "",
                H.table(["model", "setting", "requests", "max batch", "N", "LLM.generate tok/s",
                         "generate_batch tok/s", "ratio", "dk / HF GB/s", "floor tok/s",
                         "generate_batch tok/s in its loop", "greedy rows identical"],
                        [[r["model"], r["setting"], r["requests"], r["max_batch_size"],
                          r["max_new_tokens"], H.f(r["decodekit"]["tok_s"]), H.f(r["hf"]["tok_s"]),
                          H.ratio(r["ratio"]), f"{H.f(r['decodekit']['gb_s'])} / {H.f(r['hf']['gb_s'])}",
                          H.f(r["floor_tok_s"], "{:,.0f}"), H.f(r["hf"]["tok_s_in_loop"]),
                          H.f(r.get("greedy_rows_identical"), "{:.0%}")]
                         for r in serve])]
    host = [r for r in ok if r["section"] == "host"]
    if host:
        out += ["", "Host time per decode step (stub forward: no model work), us:", "",
                H.table(["model", "setting", "B", "one step per call", "32 steps per call"],
                        [[r["model"], r["setting"], r["batch"], H.f(r["host_us_1"], "{:.0f}"),
                          H.f(r["host_us_32"], "{:.0f}")] for r in host])]
    errors = [f"- {line(r)}" for r in rows if r["status"] != "ok"]
    return out + (["", "Errors:", "", *errors] if errors else [])


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.generate", "Decode tok/s of decodekit vs model.generate (per step) and "
                 "LLM.generate vs model.generate_batch (serving).")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes of the step points")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--requests", type=int, metavar="R", help="requests of the serve points")
    p.add_argument("--no-serve", action="store_true", help="skip the serve points")
    p.add_argument("--host", action="store_true", help="host time per step at B=32 (stub forward)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    import decodekit

    cuda = dev.type == "cuda"
    models = ["random:tiny"] if args.smoke else (args.model or (
        ["embedded", "random:llama-1b"] if cuda else ["embedded"]))
    batches = args.batch or ([1, 2] if args.smoke else [1, 8, 32] if cuda else [1, 8])
    n = H.check_tokens(args.max_new_tokens or (
        6 if args.smoke else (64 if args.quick else 128) if cuda else (16 if args.quick else 32)))
    repeats = args.repeats or (2 if args.quick or args.smoke else 3)
    requests = args.requests or (4 if args.smoke else 8 if args.quick else 32 if cuda else 16)
    settings = args.settings or list(SETTINGS)
    bw = H.measure_bandwidth(dev, quick=args.quick or args.smoke)
    rows, descriptions = [], {}
    for spec in models:
        wl = load_workload(spec, dev, args.dtype)
        descriptions[wl.name] = f"{wl.description}, {wl.dtype_name}"
        for batch in batches:
            longest = max(map(len, wl.encode_all(chat_prompts()[:batch])))
            gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch,
                                           max_seq_len=-(-(longest + n) // 64) * 64, seed=0)
            for setting in settings:
                rows.append(step_point(wl, gen, setting, batch, n, repeats, dev, bw))
                print(line(rows[-1]), flush=True)
            del gen
            gc.collect()
        for setting in settings if args.host else []:
            rows.append(host_point(wl, setting, 32 if not args.smoke else 2, dev))
            print(line(rows[-1]), flush=True)
        for setting in [] if args.no_serve else settings:
            rows.append(serve_point(wl, setting, requests, max(batches), n, repeats, dev, bw))
            print(line(rows[-1]), flush=True)
        del wl
        gc.collect()
    meta = H.metadata(
        dev, "wall time (time.perf_counter, device synchronised) of each next_token call / "
        "generate call; medians over repeats, sides interleaved", models=descriptions,
        settings={k: SETTINGS[k].description for k in settings}, repeats=repeats,
        max_new_tokens=n, batches=batches, requests=requests, smoke=args.smoke, quick=args.quick,
        copy_bandwidth_gb_s=bw.bytes_per_s / 1e9, bandwidth_method=bw.method,
        hf_generation_config={k: {**SETTINGS[k].hf, "disable_compile": True} for k in settings})
    H.report("generate", "Generate benchmark", args, meta, rows, body(rows, bw))
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
