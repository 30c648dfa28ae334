"""Speculative benchmark: decode tokens/s of decodekit's :class:`~decodekit.TokenGenerator` with a
drafter (NGramDraft, LayerSkipDraft, DraftModel) against the same generator without one, and at
batch 1 against Hugging Face's own prompt lookup (``generate(prompt_lookup_num_tokens=K)``) and
plain ``generate`` on the same prompts, in one run. Greedy outputs must equal plain decoding's.
Prompts: data/speculative_prompts.jsonl; method: README.md (both in bench/).

Usage: ``python -m bench.speculative [--quick] [--drafter ngram|layerskip|model|all] [--only-batch 1|big]
[--layerskip-layers 16 | I,J,..] [--layerskip-k 3] [common flags, see --help]``
"""

from __future__ import annotations

import functools
import gc
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, load_workload, prompt_set

SETTINGS = {"greedy": 0.0, "t0.7": 0.7}
K_MAIN, K_SWEEP, HF_KS = 16, (8, 16), (4, 10)  # decodekit's k; HF's prompt_lookup_num_tokens
K_MODEL = 4  # the DraftModel's k (its drafts cost forwards)
DRAFT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)  # the random DraftModel, seed 1234


@dataclass
class Run:
    """What one side did over some requests (summed)."""

    decode_s: float = 0.0
    decode_tokens: int = 0
    steps: int = 0  # target forwards (decode calls)
    row_steps: int = 0  # requests advanced, summed over decode calls
    drafted: int = 0
    accepted: int = 0
    spec_steps: int = 0
    tokens: list[list[int]] = field(default_factory=list)

    def add(self, o: Run) -> Run:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(o, f.name))
        return self

    @property
    def tok_s(self) -> float | None:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else None


Side = Callable[[list[list[int]], list[int], int], Run]  # (prompts, seeds, new tokens) -> Run


def dk_side(gen: Any, temperature: float, dev: torch.device) -> Side:
    """A side that admits its prompts at once and steps them with ``next_token`` until done."""
    from decodekit import SamplingParams

    def run(prompts: list[list[int]], seeds: list[int], n: int) -> Run:
        params = [SamplingParams(temperature=temperature, max_new_tokens=n, seed=s) for s in seeds]
        g = H.timed_generate(gen, prompts, params, dev)
        st = [c.spec_stats for c in g.contexts]
        return Run(g.decode_s, g.decode_tokens, len(g.step_s), sum(g.active),
                   sum(s.drafted for s in st), sum(s.accepted for s in st), sum(s.steps for s in st),
                   g.tokens)
    # the window costs the generator measured when built: [rows, width, cost], packed windows
    # [rows, width, tokens, cost] (a run's plan depends on them)
    run.window_cost = None if gen.speculative is None else \
        [[*(key if isinstance(key, tuple) else (key,)), round(c, 4)]
         for key, c in gen.speculative.policy.cost.table().items()]
    return run


def hf_side(wl: Workload, temperature: float, lookup: int | None) -> Side:
    """``model.generate`` one prompt at a time (HF prompt lookup is batch 1 only), with
    ``prompt_lookup_num_tokens=lookup``; decode = from the first to the last step-clock stamp."""
    sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} \
        if temperature else {"do_sample": False}

    def run(prompts: list[list[int]], seeds: list[int], n: int) -> Run:
        total = Run()
        for p, s in zip(prompts, seeds, strict=True):
            torch.manual_seed(s)
            with H.step_clock(wl.model) as clock:
                out = wl.model.generate(
                    torch.tensor([p], device=wl.model.device), max_new_tokens=n, pad_token_id=wl.pad_id,
                    disable_compile=True, stopping_criteria=[clock],
                    **({"prompt_lookup_num_tokens": lookup} if lookup else {}), **sample)
            (t0, l0), (t1, l1) = clock.stamps[0], clock.stamps[-1]
            total.add(Run(t1 - t0, l1 - l0, len(clock.stamps) - 1, len(clock.stamps) - 1,
                          tokens=[out[0, len(p):].tolist()]))
        return total
    return run


def make_gen(wl: Workload, batch: int, seq: int, draft: Any = None, policy: bool = True) -> Any:
    """A generator with decodekit's defaults; ``policy=False`` drafts ``k`` every step (the
    smoke run, which checks that every drafter path runs, not whether drafting pays)."""
    import decodekit

    return decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=batch, max_seq_len=seq,
                                    seed=0, draft=draft, adaptive_k=policy)


def run_point(wl: Workload, drafter: str, kind: str, setting: str, batch: int, prompts: list[list[int]],
              sides: dict[str, Side], n: int, repeats: int, bw: H.Bandwidth,
              tasks: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every side on the same prompts, interleaved (B=1: per prompt, order flipped per repeat);
    one row per side, medians over repeats; speedup against decodekit's plain side. At B=1
    each row also carries tok/s per task (``tasks[i]``: prompt ``i``'s; medians over repeats)."""
    seeds = [1000 + i for i in range(len(prompts))]
    groups = [[i] for i in range(len(prompts))] if batch == 1 else [list(range(len(prompts)))]
    task_of = list(tasks) or [kind] * len(prompts)
    runs: dict[str, list[Run]] = {k: [] for k in sides}
    per_task: dict[str, dict[str, list[float]]] = {k: {} for k in sides}
    for rep in range(repeats):
        tot = {k: Run() for k in sides}
        by_task: dict[str, dict[str, Run]] = {k: {} for k in sides}
        for g in groups:
            for k in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
                r = sides[k]([prompts[i] for i in g], [seeds[i] for i in g], n)
                tot[k].add(r)
                if batch == 1:
                    by_task[k].setdefault(task_of[g[0]], Run()).add(r)
        for k in sides:
            runs[k].append(tot[k])
            for t, r in by_task[k].items():
                per_task[k].setdefault(t, []).append(r.tok_s or 0.0)
    ctx = sum(map(len, prompts)) / len(prompts) + n / 2  # mean KV positions per row and step
    med = {k: H.median([r.tok_s or 0.0 for r in rs]) for k, rs in runs.items()}
    rows = []
    for k, rs in runs.items():
        plain = "hf" if k.startswith("hf") else "plain"
        pairs = [(a, b) for rp, rk in zip(runs[plain], rs, strict=True)
                 for a, b in zip(rp.tokens, rk.tokens, strict=True)]
        tot = functools.reduce(Run.add, rs, Run())
        rows_per_step = tot.row_steps / max(1, tot.steps)
        rows.append({
            "drafter": drafter, "kind": kind, "setting": setting, "temperature": SETTINGS[setting],
            "batch": batch, "side": k, "requests": len(prompts), "repeats": repeats, "status": "ok",
            "tok_s": med[k], "tok_s_all": [r.tok_s for r in rs], "plain_tok_s": med["plain"],
            "task_tok_s": {t: H.median(v) for t, v in per_task[k].items()},
            "speedup": med[k] / med["plain"] if med["plain"] else None,
            "tokens_per_step": tot.decode_tokens / tot.row_steps if tot.row_steps else None,
            "acceptance_rate": tot.accepted / tot.drafted if tot.drafted else None,
            "mean_accepted_length": 1 + tot.accepted / tot.spec_steps if tot.spec_steps else None,
            "drafted": tot.drafted, "accepted": tot.accepted,
            "gb_s": H.gb_s(tot.steps * wl.step_bytes(rows_per_step, ctx), tot.decode_s),
            "floor_tok_s": batch / bw.floor_ms(wl.step_bytes(batch, ctx)) * 1e3,
            "greedy_mismatches": None if SETTINGS[setting] or k == plain
            else sum(a != b for a, b in pairs),
            "greedy_compared": len(pairs)})
    return rows


def layers_arg(s: str) -> list[int]:
    """``N`` (the first N layers) or a list ``I,J,..`` (``I,`` for one layer)."""
    return [int(x) for x in s.split(",") if x.strip()] if "," in s else list(range(int(s)))


def random_draft(wl: Workload, dims: dict[str, Any]) -> Any:
    """A randomly initialised small LM of the target's family and vocabulary (DraftModel rows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    t = wl.model.config
    conf = AutoConfig.for_model(t.model_type, vocab_size=wl.model.get_output_embeddings().weight.shape[0],
                                max_position_embeddings=t.max_position_embeddings,
                                bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, **dims)
    torch.manual_seed(1234)
    with torch.device(wl.model.device):
        return AutoModelForCausalLM.from_config(conf).to(wl.model.dtype).eval()


def _task_line(pt: list[dict[str, Any]], kind: str, task: str, st: str, plain: dict[str, Any],
               hp: dict[str, Any]) -> str:
    """One task's line: decodekit's best n-gram k and HF's best K (by tok/s on the task)."""
    def tok(r: dict[str, Any]) -> float:
        return r["task_tok_s"].get(task) or 0.0

    def best(prefix: str) -> dict[str, Any]:
        return max((r for r in pt if r["side"].startswith(prefix)), key=tok)

    def rel(a: float, b: float) -> str:
        return H.ratio(a / b if b else None)

    dk, hf = best("ngram"), best("hf lookup")
    return (f"- {kind}/{task}, {st}, B=1: decodekit {dk['side']} {H.f(tok(dk))} tok/s "
            f"({rel(tok(dk), tok(plain))} plain) vs HF {hf['side'][3:]} {H.f(tok(hf))} tok/s "
            f"({rel(tok(hf), tok(hp))} HF plain): "
            f"ratio {rel(tok(dk), tok(hf))}")


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per prompt kind and task, B=1: decodekit's best n-gram k vs HF prompt lookup's best K
    (each side's best setting for that task); B=8: n-gram vs plain."""
    out = []
    for kind in ("copy", "open"):
        for st in SETTINGS:
            pt = [r for r in rows if (r["drafter"], r["kind"], r["setting"], r["batch"])
                  == ("ngram", kind, st, 1)]
            hp = next((r for r in pt if r["side"] == "hf"), None)
            plain = next((r for r in pt if r["side"] == "plain"), None)
            if not (hp and plain):
                continue
            for task in plain["task_tok_s"]:
                out.append(_task_line(pt, kind, task, st, plain, hp))
        for r in rows:
            if (r["drafter"], r["kind"]) == ("ngram", kind) and r["batch"] > 1 and r["side"] != "plain":
                out.append(f"- {kind}, {r['setting']}, B={r['batch']} ({r['requests']} requests): "
                           f"{r['side']} {H.f(r['tok_s'])} tok/s vs plain {H.f(r['plain_tok_s'])}: "
                           f"{H.ratio(r['speedup'])}")
    return out


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets: NGram copy greedy B=1 >= 2x, LayerSkip open greedy B=1 > 1.2x, none < 0.9x."""
    spec = sorted((r for r in rows if r["side"] != "plain" and not r["side"].startswith("hf")),
                  key=lambda r: r["speedup"] or 0)
    at = {(r["drafter"], r["kind"], r["setting"], r["batch"]): r["speedup"] for r in spec}  # best last
    ng, ls = at.get(("ngram", "copy", "greedy", 1)), at.get(("layerskip", "open", "greedy", 1))
    slow = [r for r in spec if r["speedup"] < 0.9]
    met = lambda ok: "met" if ok else "NOT met"
    return [f"- NGramDraft, copy, greedy, B=1, best k: {H.ratio(ng)} (>= 2x: {met(ng and ng >= 2)})",
            f"- LayerSkipDraft, open, greedy, B=1: {H.ratio(ls)} (> 1.2x: {met(ls and ls > 1.2)})",
            f"- below 0.9x: {len(slow)} of {len(spec)} speculative rows " + ", ".join(
                f"({r['drafter']} {r['kind']} {r['setting']} B={r['batch']} {r['side']}: "
                f"{H.ratio(r['speedup'])})" for r in slow)]


def drafters(args: Any, wl: Workload) -> dict[str, tuple[list[str], list[str], Callable[[int], dict]]]:
    """Drafter -> (prompt kinds, settings, batch -> {side name: draft})."""
    import decodekit

    dims = {**DRAFT_CONFIG, "num_hidden_layers": 1} if args.smoke else DRAFT_CONFIG
    ls = args.layerskip_layers
    return {
        "ngram": (["copy", "open"], list(SETTINGS), lambda b: {
            f"ngram k={k}": decodekit.NGramDraft(n=3, k=k, min_n=args.ngram_min_n)
            for k in (K_SWEEP if b == 1 else (K_MAIN,))}),
        "layerskip": (["open"], list(SETTINGS), lambda b: {
            f"layerskip k={args.layerskip_k}": decodekit.LayerSkipDraft(ls, k=args.layerskip_k)}),
        "model": (["open"], ["greedy"], lambda b: {
            f"model k={K_MODEL}": decodekit.DraftModel(random_draft(wl, dims), k=K_MODEL)}),
    }


def row_line(r: dict[str, Any]) -> str:
    head = f"{r['drafter']} {r['kind']} {r['setting']} B={r['batch']} {r['side']}: "
    if r["status"] != "ok":
        return head + r["status"]
    return (head + f"{H.f(r['tok_s'])} tok/s ({H.f(r['gb_s'])} GB/s), {H.ratio(r['speedup'])} plain, "
            f"accept {H.f(r['acceptance_rate'], '{:.0%}')}, tok/step {H.f(r['tokens_per_step'], '{:.2f}')}, "
            f"greedy mismatches {H.f(r['greedy_mismatches'], '{}')}")


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.speculative", "Decode tok/s with and without speculation (NGramDraft, "
                 "LayerSkipDraft, DraftModel), and against HF prompt lookup.")
    p.add_argument("--drafter", choices=["ngram", "layerskip", "model", "all"], default="all")
    p.add_argument("--ngram-min-n", type=int, default=1, help="NGramDraft min_n (default 1)")
    p.add_argument("--layerskip-layers", type=layers_arg, metavar="N|I,J,..",
                   help="LayerSkipDraft layers: first N or a list (default 16: tools/layerskip_search)")
    p.add_argument("--layerskip-k", type=int, default=3, help="LayerSkipDraft k (default 3)")
    p.add_argument("--only-batch", choices=["1", "big"], help="run only the B=1 or only the batched points")
    p.add_argument("--kind", choices=["copy", "open"], help="run only this prompt kind")
    p.add_argument("--seeds", type=int, default=1, metavar="S",
                   help="sampled settings at B=1: each prompt run with S seeds (a sampled run's tokens "
                        "differ between sides, so each side copies different text: more samples per prompt, "
                        "less noise in the per-task ratios); default 1")
    p.add_argument("--queue", type=int, default=1, metavar="Q",
                   help="batched points: Q x B requests through B slots (continuous batching: a slot is "
                        "refilled when its request ends); default 1 (B requests admitted together)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    spec = "random:tiny" if args.smoke else (args.model or ["embedded"])[0]
    wl = load_workload(spec, dev, args.dtype or "fp32")  # fp32 also on CUDA: greedy ties stay exact
    n = H.check_tokens(args.max_new_tokens or (12 if args.smoke else 32 if args.quick else 96))
    repeats = args.repeats or (1 if args.quick or args.smoke else 3)
    b1, big = (2, 8) if args.quick else (2, 2) if args.smoke else (8, 8)  # prompts at B=1; batch
    args.layerskip_layers = args.layerskip_layers or list(range(1 if args.smoke else 16))
    prompts = {k: wl.encode_all(v) for k, v in prompt_set("speculative_prompts").items()}
    tasks = prompt_set("speculative_prompts", "task")
    bw = H.measure_bandwidth(dev, quick=args.quick or args.smoke)
    rows: list[dict[str, Any]] = []
    for name, (kinds, settings, make) in drafters(args, wl).items():
        for kind, st, batch in [(k, s, b) for k in kinds for s in settings for b in (1, big)]:
            skip_batch = args.only_batch and (batch == 1) != (args.only_batch == "1")
            if args.drafter not in (name, "all") or skip_batch or args.kind not in (None, kind):
                continue
            kp, t = prompts[kind], SETTINGS[st]
            draws = max(1, args.seeds) if t and batch == 1 else 1  # prompt i's seeds: 1000 + i + b1 * j
            ps = kp[:b1] * draws if batch == 1 else [kp[i % len(kp)]
                                                     for i in range(batch * max(1, args.queue))]
            seq = H.max_seq(ps, n)
            try:
                sides = {"plain": dk_side(make_gen(wl, batch, seq), t, dev)}
                sides |= {k: dk_side(make_gen(wl, batch, seq, d, not args.smoke), t, dev)
                          for k, d in make(batch).items()}
                if name == "ngram" and batch == 1:
                    sides |= {f"hf lookup K={k}" if k else "hf": hf_side(wl, t, k) for k in (0, *HF_KS)}
                for side in sides.values():  # warm-up
                    side(ps[:batch], list(range(batch)), min(8, n))
                new = run_point(wl, name, kind, st, batch, ps, sides, n, repeats, bw,
                                tasks[kind][:b1] * draws)
            except Exception as exc:
                new = [{"drafter": name, "kind": kind, "setting": st, "batch": batch, "side": "-",
                        "status": H.short_error(exc)}]
            for r in new:
                side = sides.get(r["side"]) if r["side"] != "-" else None  # (none when the point failed)
                r["window_cost"] = getattr(side, "window_cost", None)
                print(row_line(r), flush=True)
            rows += new
            gc.collect()
    ok = [r for r in rows if r["status"] == "ok"]
    bad = [r for r in ok if r["greedy_mismatches"] and not r["side"].startswith("hf")]
    best = summary(ok)
    body = [
        f"- model {wl.description}, {wl.dtype_name}; {n} new tokens, EOS on; {b1} prompts per kind at "
        f"B=1 ({max(1, args.seeds)} seed(s) per prompt sampled); at B={big}: "
        f"{big * max(1, args.queue)} requests through {big} slots (continuous batching"
        f"{'' if args.queue > 1 else ', all admitted together'}); {repeats} repeat(s), sides interleaved, "
        "medians",
        f"- NGramDraft n=3, min_n={args.ngram_min_n}; LayerSkipDraft layers {args.layerskip_layers} of "
        f"{wl.model.config.num_hidden_layers}, k={args.layerskip_k}; DraftModel k={K_MODEL}: random, "
        f"{DRAFT_CONFIG['num_hidden_layers']} layers, hidden {DRAFT_CONFIG['hidden_size']}; "
        f"HF prompt lookup K in {list(HF_KS)}, disable_compile=True",
        f"- floor tok/s: plain decoding reading weights + KV once per step at "
        f"{bw.bytes_per_s / 1e9:.1f} GB/s; speedup: against decodekit plain (HF sides too)",
        "", f"Best vs best (B=1: decodekit's best k vs HF's best K) and batch {big}:", "", *best, "",
        "Targets:", "", *targets(ok), "",
        H.table(["drafter", "kind", "setting", "B", "side", "tok/s", "speedup", "GB/s", "floor tok/s",
                 "accept", "mean acc len", "tok/step", "greedy mismatches", "status"],
                [[r["drafter"], r["kind"], r["setting"], r["batch"], r["side"], H.f(r.get("tok_s")),
                  H.ratio(r.get("speedup")), H.f(r.get("gb_s")), H.f(r.get("floor_tok_s"), "{:,.0f}"),
                  H.f(r.get("acceptance_rate"), "{:.0%}"), H.f(r.get("mean_accepted_length"), "{:.2f}"),
                  H.f(r.get("tokens_per_step"), "{:.2f}"), "-" if r.get("greedy_mismatches") is None
                  else f"{r['greedy_mismatches']}/{r['greedy_compared']}", r["status"]] for r in rows])]
    alarms = [f"GREEDY MISMATCH: {r['drafter']} {r['kind']} B={r['batch']} {r['side']}: "
              f"{r['greedy_mismatches']} of {r['greedy_compared']} requests differ from plain" for r in bad]
    body += ["", *[f"- **{a}**" for a in alarms]] if alarms else []
    meta = H.metadata(
        dev, "wall time (time.perf_counter, device synchronised) of the decode calls after prefill; HF: "
        "first to last step-clock stamp", model=wl.description, max_new_tokens=n, repeats=repeats,
        b1_prompts=b1, sampled_seeds_per_prompt=max(1, args.seeds), kind_option=args.kind,
        smoke=args.smoke, quick=args.quick, drafter_option=args.drafter,
        k_sweep=list(K_SWEEP), hf_prompt_lookup=list(HF_KS), draft_model=DRAFT_CONFIG,
        layerskip={"layers": args.layerskip_layers, "k": args.layerskip_k}, best_vs_best=best,
        greedy_mismatches=sum(r["greedy_mismatches"] for r in bad), copy_bandwidth_gb_s=bw.bytes_per_s / 1e9)
    H.report("speculative", "Speculative decoding benchmark", args, meta, rows, body)
    print("\n".join(alarms), file=sys.stderr)
    return 1 if bad or len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
