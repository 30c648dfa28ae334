"""Tensor-parallel overhead on CPU: what rank 0's per-round broadcast of the server's commands
costs (bytes pickled, time of one ``broadcast_object_list`` over the gloo group) for typical
rounds, against a decode step of the TP model measured in the same run. CPU numbers say
nothing about TP speed on GPUs (NCCL all-reduces inside every layer); they bound the host
cost decodekit adds per engine round. Method: bench/README.md.

Usage: ``torchrun --standalone --nproc_per_node 2 -m bench.tp [--smoke]``
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import _harness as H
from ._models import word_tokenizer


def rounds() -> dict[str, list]:
    """Command lists as the server's engine sends them (see decodekit.serving.engine)."""
    from decodekit import SamplingParams

    def submit(key: int, tokens: int) -> tuple:
        params = [SamplingParams(max_new_tokens=256, temperature=0.8, top_p=0.95, seed=key)]
        return ("submit", key, ([list(range(3, 3 + tokens))], params, {}, False))
    return {"idle round (no command)": [],
            "1 cancellation": [("cancel", 7, None)],
            "1 submission, 64-token prompt": [submit(0, 64)],
            "8 submissions, 512-token prompts": [submit(i, 512) for i in range(8)]}


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser("bench.tp", description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="few repeats, a smaller model")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.distributed import DistributedConfig

    from decodekit import LLM, SamplingParams
    from decodekit.engine.parallel import cpu_group, init_distributed, is_leader

    init_distributed()
    torch.set_num_threads(1)
    group, repeats = cpu_group(), 5 if args.smoke else 50
    rows = []
    for name, cmds in rounds().items():
        size = len(pickle.dumps(cmds))
        sec = _time(lambda cmds=cmds: dist.broadcast_object_list([cmds if is_leader() else None], src=0,
                                                                   group=group), repeats)
        rows.append({"round": name, "bytes": size, "broadcast_ms": sec * 1e3})
    # a TP decode step of a small Llama (random weights, 4 KV heads: divisible by 2 ranks)
    cfg = LlamaConfig(hidden_size=256 if args.smoke else 512, intermediate_size=1024 if args.smoke else 1536,
                      num_hidden_layers=4 if args.smoke else 8, num_attention_heads=8, num_key_value_heads=4,
                      vocab_size=4096 if args.smoke else 32000, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as tmp:
        folder = [tmp if is_leader() else None]
        dist.broadcast_object_list(folder, src=0, group=group)
        if is_leader():
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp)
        dist.barrier(group=group)
        model = AutoModelForCausalLM.from_pretrained(folder[0], dtype=torch.float32,
                                                     distributed_config=DistributedConfig(tp_plan="auto"))
        dist.barrier(group=group)
    tok = word_tokenizer(cfg.vocab_size)
    llm = LLM(model=model, tokenizer=tok, max_batch_size=8, max_seq_len=256, seed=0)
    prompts = [[1, *range(10 + i, 42 + i)] for i in range(8)]
    n = 8 if args.smoke else 32
    params = SamplingParams(max_new_tokens=n, ignore_eos=True, temperature=0.8, seed=1)
    llm.generate(prompts, params)  # warm-up
    step = _time(lambda: llm.generate(prompts, params), 1 if args.smoke else 3) / n
    if is_leader():
        desc = f"random Llama {cfg.num_hidden_layers}x{cfg.hidden_size}, V={cfg.vocab_size}"
        meta = H.metadata(torch.device("cpu"), "time.perf_counter after a barrier; median",
                          ranks=dist.get_world_size(), repeats=repeats, model=desc, smoke=args.smoke)
        for r in rows:
            r["share_of_step"] = r["broadcast_ms"] / (step * 1e3)
        body = [f"- decode step of the TP model (8 requests, generate / tokens, {n} tokens): "
                f"{step * 1e3:.1f} ms; one engine round = one broadcast + at least one step", "",
                H.table(["round", "pickled bytes", "broadcast ms (median)", "vs one decode step"],
                        [[r["round"], f"{r['bytes']:,}", f"{r['broadcast_ms']:.3f}",
                          f"{r['share_of_step']:.1%}"] for r in rows])]
        ns = argparse.Namespace(smoke=args.smoke, tag=None, out=args.out, load_avg_start=H.load_average())
        H.report("tp", "Tensor-parallel host overhead (CPU, gloo)", ns, meta,
                 [*rows, {"round": "decode step", "step_ms": step * 1e3}], body)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
