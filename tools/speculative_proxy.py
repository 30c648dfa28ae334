"""Work per token of prompt lookup, without timing noise: decodekit's NGramDraft (k=16, its
draft policy) and Hugging Face's prompt lookup (K in {4, 10}) on the copy prompts of
``bench.speculative``, batch 1, each forward priced by one fixed table of relative costs per
window width (``--table``, default this CPU's: SmolLM2 fp32 on 2 cores), which decodekit's
policy also plans with. Prints tokens per unit of cost per task and decodekit's ratio to HF's
best K. Greedy outputs are the same on every side, so the ratio compares the work per token
alone; sampled outputs differ between sides (and between two decodekit policies), so use many
``--seeds`` (8 per prompt tells 3-5% apart, 1 does not). For A/B runs of a policy change:
``--no-hf`` and compare decodekit's tokens per cost between two checkouts. One generator serves
every request in prompt order and its policy pools what it learns per evidence class over
requests, so a task's number depends on the tasks run before it: compare runs of the same
``--task`` selection.

``--batch B`` (B > 1): decodekit's plain steps and NGramDraft windows on ``B`` prompts of
``--kind`` admitted together (as ``bench.speculative --only-batch big``), each forward priced
by ``(rows, width)`` in ``--table`` (default :data:`TABLE_B8`, measured at 1, 2 and 8 rows by
``--measure``); prints tokens per unit of cost of both and their ratio. HF's prompt lookup is
batch 1 only. ``--measure``: time this machine's table (``WindowCost.measure``) and print it
as JSON for ``--table``.

Usage: ``python -m tools.speculative_proxy [--temperature T] [--seeds S] [--task NAME] [--no-hf]
[--batch B --kind copy|open] [--table JSON] [--measure]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bench import _harness as H
from bench._models import load_workload, prompt_set

TABLE = {1: 1.00, 2: 1.07, 3: 1.13, 4: 1.48, 5: 1.53, 6: 1.57, 7: 1.77, 8: 1.83, 9: 1.88, 10: 2.04,
         11: 2.07, 12: 2.13, 13: 2.27, 14: 2.30, 15: 2.35, 16: 2.35, 17: 2.35}  # 2026-12-03, this VM


# (rows, width) -> relative cost, packed windows (rows, width, rows + width - 1); one row as TABLE
TABLE_B8: dict[Any, float] = {  # --measure --batch 8, 2026-12-04, this VM (packed: rows, width, tokens)
    **TABLE, (2, 1): 1.0296, (2, 2): 1.4084, (2, 4): 1.7286, (2, 8): 1.8297, (2, 17): 2.3146, (8, 1): 1.9618,
    (8, 2): 2.0006, (8, 4): 2.4431, (8, 8): 3.6058, (8, 17): 5.2436, (2, 17, 18): 2.2419,
    (8, 4, 11): 2.2419, (8, 8, 15): 2.287, (8, 17, 24): 2.7501}


def parse_table(text: str) -> dict[Any, float]:
    """``--table`` JSON: ``{"width": cost}``, ``{"rows,width": cost}`` or, packed windows,
    ``{"rows,width,tokens": cost}``."""
    out: dict[Any, float] = {}
    for k, v in json.loads(text).items():
        if k == "cell":
            out[k] = float(v)
            continue
        parts = [int(x) for x in str(k).split(",")]
        out[parts[0] if len(parts) == 1 else tuple(parts)] = float(v)
    return out


@dataclass
class Work:
    tokens: int = 0
    cost: float = 0.0

    @property
    def per_cost(self) -> float:
        return self.tokens / self.cost if self.cost else 0.0


def shapes_of(model: torch.nn.Module) -> tuple[list[tuple[int, int, int]], Any]:
    """A list that collects ``(rows, width, tokens)`` of every forward of ``model`` (a packed
    window: its grid, from the attention mask, and the tokens it carries), and the hook's handle."""
    seen: list[tuple[int, int, int]] = []

    def hook(_m: Any, args: tuple, kw: dict) -> None:
        ids = kw.get("input_ids")
        B, q = (args[0] if ids is None else ids).shape[:2]
        mask = kw.get("attention_mask")
        mask = next(iter(mask.values())) if isinstance(mask, dict) else mask
        if mask is not None and mask.dim() == 4 and mask.shape[0] * mask.shape[2] != B * q:  # packed
            seen.append((mask.shape[0], mask.shape[2], q))
        else:
            seen.append((B, q, B * q))
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import decodekit

    table = parse_table(args.table) if args.table else TABLE
    wl = load_workload("embedded", torch.device("cpu"), "fp32")
    tasks = prompt_set("speculative_prompts", "task")["copy"]
    prompts = wl.encode_all(prompt_set("speculative_prompts")["copy"])
    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=1,
                                   max_seq_len=H.max_seq(prompts, 96), seed=0,
                                   draft=decodekit.NGramDraft(n=3, k=16), window_cost=table)
    cost = gen.speculative.policy.cost
    seen, handle = shapes_of(wl.model)
    sides = ["decodekit"] + ([] if args.no_hf else ["hf K=4", "hf K=10"])
    work: dict[str, dict[str, Work]] = {}
    sample = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0} \
        if args.temperature else {"do_sample": False}
    try:
        for i, (p, task) in enumerate(zip(prompts, tasks, strict=True)):
            if args.task not in (None, task):
                continue
            for j in range(args.seeds if args.temperature else 1):
                seed = 1000 + i + 8 * j  # as bench.speculative --seeds
                for side in sides:
                    seen.clear()
                    if side == "decodekit":
                        params = decodekit.SamplingParams(temperature=args.temperature, max_new_tokens=96,
                                                          seed=seed)
                        n = H.timed_generate(gen, [p], [params], torch.device("cpu")).decode_tokens
                    else:
                        torch.manual_seed(seed)
                        out = wl.model.generate(torch.tensor([p]), max_new_tokens=96, pad_token_id=wl.pad_id,
                                                disable_compile=True,
                                                prompt_lookup_num_tokens=int(side.split("=")[1]), **sample)
                        n = out.shape[1] - len(p) - 1  # after the first token, as decodekit's decode
                    w = work.setdefault(task, {}).setdefault(side, Work())
                    w.tokens += n
                    w.cost += sum(cost(1, x) for _, x, _t in seen[1:])  # the prefill left out
    finally:
        handle.remove()
    return {t: {s: w.per_cost for s, w in by.items()} for t, by in work.items()}


def run_batch(args: argparse.Namespace) -> dict[str, Work]:
    """Plain steps and NGramDraft (k=16) windows on ``args.batch`` prompts of ``args.kind``
    admitted together (``args.queue`` times as many through ``args.batch`` slots),
    ``args.seeds`` rounds when sampled (prompt ``i``'s seed ``1000 + i + 8j``):
    tokens and cost per side (prefill forwards, wider than any window, left out)."""
    import decodekit
    from decodekit.speculative.policy import WindowCost

    if not args.table and not TABLE_B8:
        raise SystemExit("--batch needs a (rows, width) table: run --measure and pass it as --table")
    table = parse_table(args.table) if args.table else TABLE_B8
    cost, k = WindowCost(table), 16
    wl = load_workload("embedded", torch.device("cpu"), "fp32")
    kp = wl.encode_all(prompt_set("speculative_prompts")[args.kind])
    prompts = [kp[i % len(kp)] for i in range(args.batch * args.queue)]
    gens = {side: decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=args.batch,
                                           max_seq_len=H.max_seq(prompts, 96), seed=0, draft=draft,
                                           window_cost=table)
            for side, draft in (("plain", None), (f"k={k}", decodekit.NGramDraft(n=3, k=k)))}
    seen, handle = shapes_of(wl.model)
    work = {side: Work() for side in gens}
    try:
        for j in range(args.seeds if args.temperature else 1):
            for side, gen in gens.items():
                params = [decodekit.SamplingParams(temperature=args.temperature, max_new_tokens=96,
                                                   seed=1000 + i + 8 * j) for i in range(len(prompts))]
                seen.clear()
                n = H.timed_generate(gen, prompts, params, torch.device("cpu")).decode_tokens
                work[side].tokens += n
                work[side].cost += sum(cost.packed(r, x, t) for r, x, t in seen if x <= k + 1)
    finally:
        handle.remove()
    return work


def measure(args: argparse.Namespace) -> str:
    """This machine's window costs at ``args.batch`` slots (1, 2 and 8 rows at 8), as --table JSON."""
    import decodekit

    wl = load_workload("embedded", torch.device("cpu"), "fp32")
    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=args.batch, max_seq_len=512,
                                   seed=0, draft=decodekit.NGramDraft(n=3, k=16))
    return json.dumps({",".join(map(str, key)) if isinstance(key, tuple) else key: round(c, 4)
                       for key, c in gen.speculative.policy.cost.table().items()})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser("tools.speculative_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=3, help="sampled: seeds per prompt (default 3)")
    p.add_argument("--task", help="one copy task (repeat, fix spelling, numbered list, same words)")
    p.add_argument("--no-hf", action="store_true", help="decodekit only (A/B of two checkouts)")
    p.add_argument("--table", help='relative cost per width as JSON, e.g. \'{"1": 1.0, "17": 2.3}\'')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="B > 1: plain vs k=16 on B prompts together")
    p.add_argument("--kind", choices=["copy", "open"], default="copy", help="--batch: the prompts")
    p.add_argument("--queue", type=int, default=1, help="--batch: B * Q requests through the B slots")
    p.add_argument("--measure", action="store_true", help="print this machine's --table (at --batch slots)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.measure:
        print(measure(args))
        return 0
    if args.batch > 1:
        work = run_batch(args)
        (plain, w_plain), (spec, w_spec) = work.items()
        print(f"B={args.batch} x{args.queue} {args.kind}, t={args.temperature}: "
              f"{plain} {w_plain.per_cost:.3f} tok/cost, "
              f"{spec} {w_spec.per_cost:.3f} tok/cost; {spec} / {plain}: "
              f"{w_spec.per_cost / w_plain.per_cost:.3f}x")
        return 0
    for task, by in run(args).items():
        hf = max((v for s, v in by.items() if s.startswith("hf")), default=0.0)
        ratio = f"{by['decodekit'] / hf:.2f}x" if hf else "-"
        print(f"{task}, t={args.temperature}: " + ", ".join(f"{s} {v:.2f} tok/cost" for s, v in by.items())
              + f"; decodekit / HF best: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
