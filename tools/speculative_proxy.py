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

Usage: ``python -m tools.speculative_proxy [--temperature T] [--seeds S] [--task NAME] [--no-hf]``
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


@dataclass
class Work:
    tokens: int = 0
    cost: float = 0.0

    @property
    def per_cost(self) -> float:
        return self.tokens / self.cost if self.cost else 0.0


def widths_of(model: torch.nn.Module) -> tuple[list[int], Any]:
    """A list that collects the width of every forward of ``model``, and the hook's handle."""
    seen: list[int] = []

    def hook(_m: Any, args: tuple, kw: dict) -> None:
        ids = kw.get("input_ids")
        seen.append((args[0] if ids is None else ids).shape[1])
    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import decodekit

    table = {int(k): float(v) for k, v in json.loads(args.table).items()} if args.table else TABLE
    wl = load_workload("embedded", torch.device("cpu"), "fp32")
    tasks = prompt_set("speculative_prompts", "task")["copy"]
    prompts = wl.encode_all(prompt_set("speculative_prompts")["copy"])
    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=1,
                                   max_seq_len=H.max_seq(prompts, 96), seed=0,
                                   draft=decodekit.NGramDraft(n=3, k=16), window_cost=table)
    cost = gen.speculative.policy.cost
    seen, handle = widths_of(wl.model)
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
                    w.cost += sum(cost(1, x) for x in seen[1:])  # the prefill left out
    finally:
        handle.remove()
    return {t: {s: w.per_cost for s, w in by.items()} for t, by in work.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser("tools.speculative_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seeds", type=int, default=3, help="sampled: seeds per prompt (default 3)")
    p.add_argument("--task", help="one copy task (repeat, fix spelling, numbered list, same words)")
    p.add_argument("--no-hf", action="store_true", help="decodekit only (A/B of two checkouts)")
    p.add_argument("--table", help='relative cost per width as JSON, e.g. \'{"1": 1.0, "17": 2.3}\'')
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for task, by in run(args).items():
        hf = max((v for s, v in by.items() if s.startswith("hf")), default=0.0)
        ratio = f"{by['decodekit'] / hf:.2f}x" if hf else "-"
        print(f"{task}, t={args.temperature}: " + ", ".join(f"{s} {v:.2f} tok/cost" for s, v in by.items())
              + f"; decodekit / HF best: {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
