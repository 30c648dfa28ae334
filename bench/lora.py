"""LoRA benchmark: decode tokens/s of :class:`~decodekit.TokenGenerator` with per-request LoRA
adapters against the same generator without LoRA support, in the same run: (a) no LoRA support,
(b) support with adapters loaded but no request using one, (c) every request a different
adapter, (d) half the requests adapted. Adapters: random, rank 16 on q/k/v/o (peft format).

Usage: ``python -m bench.lora [--batch 1 8 32] [--rank R] [common flags, see --help]``
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload

CONFIGS = {"a": "no LoRA support", "b": "adapters loaded, none used", "c": "every request its own adapter",
           "d": "half the requests adapted"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapters(model: torch.nn.Module, n: int, rank: int, root: Path) -> list[Path]:
    """``n`` random peft-format adapters of ``rank`` on the attention projections of every layer."""
    from safetensors.torch import save_file

    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        weights = {}
        for name, m in linears.items():
            key = f"base_model.model.{name}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.02
            weights[f"{key}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.02
        path = root / f"adapter{i}"
        path.mkdir()
        save_file(weights, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
             "bias": "none"}))
        paths.append(path)
    return paths


def run_config(wl: Workload, cfg: str, prompts: list[list[int]], paths: list[Path], rank: int, n: int,
               dev: torch.device) -> H.GenRun:
    """One timed generation of ``prompts`` in configuration ``cfg`` on a fresh generator."""
    import decodekit

    B = len(prompts)
    kw = {} if cfg == "a" else {"max_loras": B, "max_lora_rank": rank}
    gen = decodekit.TokenGenerator(wl.model, wl.tokenizer, max_batch_size=B,
                                   max_seq_len=max(map(len, prompts)) + n + 1, seed=0, **kw)
    names = []
    if cfg != "a":
        for i, p in enumerate(paths[:B]):
            res = gen.load_lora(f"l{i}", p)
            if not res.ok:
                raise RuntimeError(res.message)
            names.append(f"l{i}")
    lora = {"a": [None] * B, "b": [None] * B, "c": names,
            "d": [x if i % 2 == 0 else None for i, x in enumerate(names)]}[cfg]
    params = [decodekit.SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)] * B
    return H.timed_generate(gen, prompts, params, dev, lora=lora)


def run_point(wl: Workload, B: int, paths: list[Path], rank: int, n: int, repeats: int, dev: torch.device
              ) -> list[dict[str, Any]]:
    """Every configuration at batch ``B``, interleaved over the repeats (rotating order)."""
    texts = wl.encode_all(chat_prompts())
    prompts = [texts[i % len(texts)] for i in range(B)]
    cfgs = [c for c in CONFIGS if not (c == "d" and B < 2)]
    runs: dict[str, list[H.GenRun]] = {c: [] for c in cfgs}
    status = {c: "ok" for c in cfgs}
    for r in range(repeats):
        for c in cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]:
            if status[c] == "ok":
                try:
                    runs[c].append(run_config(wl, c, prompts, paths, rank, n, dev))
                except Exception as exc:  # noqa: BLE001 - a failing configuration is a result
                    status[c] = H.short_error(exc)
            gc.collect()
    base = H.median([x.decode_s for x in runs["a"]]) if runs["a"] else None
    rows = []
    for c in cfgs:
        row: dict[str, Any] = {"config": c, "description": CONFIGS[c], "batch": B, "status": status[c]}
        if runs[c] and base:
            decode_s = H.median([x.decode_s for x in runs[c]])
            paired = [(x.decode_s / b.decode_s - 1) * 100 for x, b in zip(runs[c], runs["a"], strict=False)]
            pairs = zip(runs[c][-1].tokens, runs["a"][-1].tokens, range(B), strict=True)
            plain = [t == u for t, u, i in pairs if c == "b" or (c == "d" and i % 2 == 1)]
            row.update(tok_s=B * (n - 1) / decode_s, overhead_pct=(decode_s / base - 1) * 100,
                       overhead_pct_paired=H.median(paired), plain_rows_identical=all(plain))
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.lora", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes (default 1 8 32)")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (16)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    batches = args.batch or ([1, 2] if args.smoke else [1, 8] if args.quick else [1, 8, 32])
    n = H.check_tokens(args.max_new_tokens or (4 if args.smoke else 12 if args.quick else 24))
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 3)
    wl = load_workload("random:tiny" if args.smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(wl.model, max(batches), args.rank, Path(tmp))
        for B in batches:
            rows += run_point(wl, B, paths, args.rank, n, repeats, dev)
    meta = H.metadata(dev, "decode wall time (time.perf_counter, device synchronised) of every decode call, "
                      "median over repeats, configurations interleaved",
                      model=f"{wl.description}, {wl.dtype_name}", rank=args.rank, targets=list(TARGETS),
                      max_new_tokens=n, repeats=repeats)
    pct = lambda x: H.f(x, "{:+.1f}%")  # noqa: E731
    body = [f"- {wl.description}, {wl.dtype_name}; greedy, ignore EOS, {n} tokens; random adapters of rank "
            f"{args.rank} on {', '.join(TARGETS)} of every layer; {repeats} repeats, a fresh generator per "
            "run",
            "",
            H.table(["config", "B", "decode tok/s", "overhead vs (a)", "paired", "unadapted rows = (a)"],
                    [[f"({r['config']}) {r['description']}", r["batch"], H.f(r.get("tok_s")),
                      pct(r.get("overhead_pct")), pct(r.get("overhead_pct_paired")),
                      r.get("plain_rows_identical", r["status"])] for r in rows])]
    H.report("lora", "LoRA benchmark", args, meta, rows, body)
    return 0 if all(r["status"] == "ok" and r.get("plain_rows_identical") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
