#!/usr/bin/env python3
"""One-call GPU check: correctness first, then timings, inside one time budget.

``make gpu-check`` (``python3 tools/gpu_check.py --out bench/results/gpu-check``) on a
single-GPU machine with no network: nothing is fetched and no model file is needed
(randomly initialised models of real shapes: Llama-3.2-1B in bf16, Qwen2.5-0.5B's vocabulary,
tiny fp32 models for exactness). Every phase appends one JSON line to ``OUT/results.jsonl``
when it ends (so a timeout keeps what finished) and the benchmarks write their
``bench/results/*-<gpu>.{md,json}`` files. A phase starts only if its estimate fits in what is
left of ``--budget-s``.

``--smoke`` (``make gpu-check SMOKE=1``; the test suite runs it) runs the same phases at toy
sizes on whatever device there is -- on a CPU the Triton interpreter and a CUDA-graph stand-in
that replays eagerly -- so the harness does not rot between GPU sessions.

Phases (estimated seconds on an H200 / smoke on 2 CPU cores):
  env            versions, device, copy bandwidth
  kernels        the kernel test files on the device (compiled kernels vs the torch reference)
  sampler_real   Triton sampler vs the torch reference at real sizes, every setting, offsets
                 past 2**31 elements (skipped in smoke)
  graphs         decode graphs = eager = HF greedy on tiny fp32 models, slot reuse, steered
  sampler        bench.sampler: B in {1, 8, 64, 256} x V in {32000, 128256, 151936}
  generate       bench.generate on random:llama-1b (bf16) vs HF static / dynamic cache; host time per step
  speculative    bench.speculative (n-gram, random llama-1b)
  steering       bench.steering (steering overhead, in graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

T0 = time.time()


class Check:
    """The run: arguments, the device, the results file."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.args, self.smoke = args, args.smoke
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = (self.out / "results.jsonl").open("a")

    def left(self) -> float:
        return self.args.budget_s - (time.time() - T0)

    def record(self, phase: str, **row: Any) -> dict[str, Any]:
        row = {"phase": phase, "t_s": round(time.time() - T0, 1), **row}
        self.results.write(json.dumps(row, default=repr) + "\n")
        self.results.flush()
        print(json.dumps(row, default=repr)[:2000], flush=True)
        return row

    def run(self, cmd: list[str], timeout: float) -> dict[str, Any]:
        """A subprocess phase: return code, seconds, the tail of its output."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.device.type == "cpu":
            env["TRITON_INTERPRET"] = "1"
        t = time.time()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"timeout after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
        return {"ok": rc == 0, "rc": rc, "seconds": round(time.time() - t, 1), "tail": str(text)[-3000:]}


# ----------------------------------------------------------------------------- phases
def phase_env(c: Check) -> dict[str, Any]:
    import torch
    import transformers
    import triton

    from bench import _harness as H

    info: dict[str, Any] = {"device": H.device_name(c.device), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "triton": triton.__version__,
                            "transformers": transformers.__version__, "python": sys.version.split()[0]}
    if c.device.type == "cuda":
        p = torch.cuda.get_device_properties(c.device)
        info |= {"sms": p.multi_processor_count, "cc": f"{p.major}.{p.minor}",
                 "memory_gib": round(p.total_memory / 2**30, 1)}
    info["copy_gb_s"] = round(H.measure_bandwidth(c.device, quick=True).bytes_per_s / 1e9, 1)
    return {"ok": True, **info}


def phase_kernels(c: Check) -> dict[str, Any]:
    files = ["tests/test_kernels.py", "tests/test_bands.py", "tests/test_verify.py", "tests/test_window.py",
             "tests/test_sampler.py", "tests/test_paged_attention.py", "tests/test_paging.py",
             "tests/test_lora_kernels.py"]
    select = ["-k", "matches_reference_over_steps and (top_p or typical)"] if c.smoke else ["-k", "not aot"]
    if c.smoke:
        files = files[:1]
    return c.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
                  *select, *files], c.left() - 10)


def phase_sampler_real(c: Check) -> dict[str, Any]:
    """Compiled sampler vs the torch reference at real sizes; rows whose offset passes 2**31."""
    import torch

    from decodekit import Sampler, SamplingParams

    if c.smoke:
        return {"ok": True, "skipped": "real sizes need a GPU"}
    out: dict[str, Any] = {"ok": True, "cases": []}
    settings = {"temp": dict(temperature=0.8), "topk_topp": dict(top_k=50, top_p=0.9),
                "all": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, typical_p=0.95,
                            repetition_penalty=1.1, logit_bias={5: 2.0})}
    for name, kw in settings.items():
        for B, V in ((64, 128256), (8, 151936)):
            g = torch.Generator(device=c.device).manual_seed(B)
            logits = torch.randn(B, V, device=c.device, generator=g)
            toks = []
            for backend in ("triton", "torch"):
                s = Sampler(V, B, c.device, backend=backend)
                for b in range(B):
                    s.add(b, SamplingParams(seed=b, **kw), [3, 4, 5])
                toks.append(s.sample(logits, list(range(B))).token_ids.cpu())
            same = int((toks[0] == toks[1]).sum())
            out["cases"].append({"setting": name, "B": B, "V": V, "same_tokens": same})
            out["ok"] &= same >= B - 1  # a token within fp32 rounding of a threshold may differ
    V = 151936
    B = (1 << 31) // V + 2  # the last rows start past 2**31 elements
    logits = torch.full((B, V), -5.0, device=c.device)
    logits[torch.arange(B), torch.arange(B) % V] = 5.0
    s = Sampler(V, B, c.device, backend="triton")
    for b in range(B):
        s.add(b, SamplingParams(temperature=0.0))
    tok = s.sample(logits, torch.arange(B, dtype=torch.int32, device=c.device)).token_ids
    out["offsets_past_2_31"] = bool((tok.cpu() == torch.arange(B) % V).all())
    out["ok"] &= out["offsets_past_2_31"]
    return out


def phase_attention(c: Check) -> dict[str, Any]:
    """Paged decode attention (Llama-3.2-1B heads: 32 query, 8 KV, head_dim 64, bf16) against
    SDPA over a static cache with a full-length mask (K/V expanded per query head, as
    transformers 5.17 does with a mask): time, bytes of live K/V read, GB/s; and the
    kernel's error against the torch reference."""
    shape = (32, 8, 64, 8192) if not c.smoke else (4, 2, 16, 64)
    points = [(b, n) for b in (1, 32, 64) for n in (512, 2048, 8192)] if not c.smoke else [(1, 40)]
    out: dict[str, Any] = {"ok": True, "points": [_attention_point(c, B, n, *shape) for B, n in points]}
    out["ok"] = all(p["ok"] for p in out["points"])
    return out


def _attention_point(c: Check, B: int, n: int, heads: int, kv_heads: int, D: int, max_len: int
                     ) -> dict[str, Any]:
    import torch
    from decodekit.kernels.paged_attention import paged_attention

    from bench import _harness as H
    from decodekit.engine.attention import paged_attention_reference

    dev, dt, BS = c.device, (torch.bfloat16 if c.device.type == "cuda" else torch.float32), 16
    width, scale = max_len // BS, D ** -0.5
    g = torch.Generator(device=dev).manual_seed(B + n)
    k = torch.randn(B * width + 1, BS, kv_heads, D, device=dev, generator=g).to(dt)
    v = torch.randn(B * width + 1, BS, kv_heads, D, device=dev, generator=g).to(dt)
    tables = (torch.randperm(B * width, device=dev, generator=g) + 1).view(B, width)
    lens = torch.full((B,), n, device=dev)
    q = torch.randn(B, heads, 1, D, device=dev, generator=g).to(dt)
    q_pos = (lens - 1)[:, None]
    args = (q, k, v, tables, lens, q_pos, scale)
    err = None
    if B * n <= 32 * 2048:
        err = (paged_attention(*args).float() - paged_attention_reference(*args).float()).abs().max().item()
    t_kernel = H.bench_ms(lambda: paged_attention(*args), dev)
    ks = k[tables].view(B, max_len, kv_heads, D).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    vs = v[tables].view(B, max_len, kv_heads, D).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    mask = (torch.arange(max_len, device=dev) < n)[None, None, None, :].expand(B, 1, 1, max_len)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    t_sdpa = H.bench_ms(lambda: sdpa(q, ks, vs, attn_mask=mask), dev)
    live = 2 * B * n * kv_heads * D * k.element_size()
    return {"B": B, "len": n, "kernel_ms": t_kernel, "sdpa_full_ms": t_sdpa, "speedup": t_sdpa / t_kernel,
            "live_kv_mb": live / 2**20, "kernel_gb_s": live / t_kernel / 1e6, "max_err": err,
            "ok": err is None or err < (2e-2 if dt != torch.float32 else 1e-4)}


def phase_graphs(c: Check) -> dict[str, Any]:
    """Decode graphs (CUDA, or the eager stand-in on CPU) = eager = HF greedy, with slot reuse
    and steered rows, on tiny fp32 models of three architectures."""
    import torch
    from _models import hf_greedy, tiny_model, word_tokenizer

    from decodekit import SamplingParams, Steering, SteeringVector, TokenGenerator
    from decodekit.engine.graphs import eager_capture

    out: dict[str, Any] = {"ok": True, "archs": {}}
    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33, 34]]
    for arch in ("llama", "qwen3", "gemma2"):
        model = tiny_model(arch).to(c.device)
        gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64,
                             cuda_graphs=c.device.type == "cuda")
        if c.device.type != "cuda":
            gen.runner.enable_graphs(capture=eager_capture)
        params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
        ctxs = [gen.new_context(p, params, str(i)) for i, p in enumerate(prompts)]
        batch, waiting = {x.request_id: x for x in ctxs[:4]}, ctxs[4:]  # the fifth reuses a slot
        while batch:
            for rid, r in gen.next_token(batch).items():
                if r.is_done:
                    gen.release(batch.pop(rid))
                    if waiting:
                        x = waiting.pop()
                        batch[x.request_id] = x
        greedy_ok = all(x.generated_token_ids == hf_greedy(model, p, 8)
                        for x, p in zip(ctxs, prompts, strict=True))
        g = torch.Generator().manual_seed(0)
        vec = SteeringVector({i: 3 * torch.randn(64, generator=g) / 8 for i in (0, 1)})
        runs = []
        for graphs in (True, False):
            e = TokenGenerator(model, word_tokenizer(), max_batch_size=2, max_seq_len=64,
                               cuda_graphs=graphs and c.device.type == "cuda")
            if graphs and c.device.type != "cuda":
                e.runner.enable_graphs(capture=eager_capture)
            xs = [e.new_context(p, params, steering=s) for p, s in zip(prompts[:2], [Steering(vec), None],
                                                                        strict=True)]
            while any(not x.is_done for x in xs):
                e.next_token({x.request_id: x for x in xs if not x.is_done})
            runs.append([x.generated_token_ids for x in xs])
        failed = sorted(gen.runner.graphs.failed) if gen.runner.graphs else "none captured"
        spec = _speculative_graphs(c, model, prompts[:3]) if arch == "llama" else {}
        out["archs"][arch] = {"greedy_equals_hf": greedy_ok, "steered_graph_equals_eager": runs[0] == runs[1],
                              "failed_buckets": failed, **spec}
        out["ok"] &= greedy_ok and runs[0] == runs[1] and failed == [] and all(spec.values())
    return out


def _speculative_graphs(c: Check, model, prompts: list[list[int]]) -> dict[str, bool]:
    """Greedy speculative decoding with verification windows and drafting steps in graphs
    (every drafter kind) = HF greedy, with no bucket falling back."""
    from _models import hf_greedy, word_tokenizer

    from decodekit import DraftModel, LayerSkipDraft, NGramDraft, SamplingParams, TokenGenerator
    from decodekit.engine.graphs import eager_capture

    res = {}
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    for name, draft in (("ngram", NGramDraft(n=1, k=4)), ("draft_model", DraftModel(model, k=4)),
                        ("layer_skip", LayerSkipDraft(1, k=4))):
        # adaptive_k=False: the check is about exactness in graphs, so every step drafts (the
        # draft policy would, rightly, never draft with a drafter as costly as the model).
        gen = TokenGenerator(model, word_tokenizer(), max_batch_size=4, max_seq_len=64, draft=draft,
                             adaptive_k=False, cuda_graphs=c.device.type == "cuda")
        if c.device.type != "cuda":
            gen.enable_graphs(eager_capture)
        sets = list(gen.runner.window_graphs.values())
        ok = bool(sets) and not any(g.failed for g in sets)
        for p in prompts:
            x = gen.new_context(p, params)
            while not x.is_done:
                gen.next_token({x.request_id: x})
            ok &= x.generated_token_ids == hf_greedy(model, p, 12)
        res[f"spec_graphs_{name}_equal_hf"] = ok and gen.spec_stats.steps > 0
    return res


def bench_phase(module: str, full: list[str], smoke: list[str]) -> Callable[[Check], dict[str, Any]]:
    def run(c: Check) -> dict[str, Any]:
        extra = smoke if c.smoke else full
        return c.run([sys.executable, "-m", module, "--out", str(c.args.results), *extra], c.left() - 5)
    return run


PHASES: list[tuple[str, float, float, Callable[[Check], dict[str, Any]]]] = [
    # name, estimated seconds on an H200, in smoke on a CPU, function
    ("env", 10, 5, phase_env),
    ("kernels", 90, 40, phase_kernels),
    ("sampler_real", 30, 1, phase_sampler_real),
    ("graphs", 30, 20, phase_graphs),
    ("attention", 40, 10, phase_attention),
    ("sampler", 60, 20, bench_phase("bench.sampler", [], ["--quick", "--batch", "1", "--vocab", "512",
                                                            "--settings", "topk_topp", "--dists", "flat"])),
    ("generate", 120, 60, bench_phase("bench.generate", ["--model", "random:llama-1b", "--quick", "--host"],
                                      ["--smoke", "--host"])),
    ("speculative", 60, 60, bench_phase("bench.speculative", ["--model", "random:llama-1b", "--quick",
                                                                "--drafter", "ngram"], ["--smoke"])),
    ("steering", 60, 40, bench_phase("bench.steering", ["--model", "random:llama-1b", "--quick"],
                                     ["--smoke"])),
]


def ensure_importable() -> str:
    """``decodekit.kernels`` is the ``triton_kernels`` folder (pyproject's package-dir): without
    an install (a GPU machine with no network) install it in place with nothing fetched, or
    else link the folder where the import looks."""
    probe = [sys.executable, "-c", "import decodekit.kernels.bands"]
    if subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0:
        return "importable"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
           "-e", "."]
    if subprocess.run(pip, cwd=ROOT, capture_output=True).returncode == 0 \
            and subprocess.run(probe, cwd=ROOT, capture_output=True).returncode == 0:
        return "installed in place (pip -e, no index)"
    link = ROOT / "decodekit" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "triton_kernels")
    return "linked decodekit/kernels -> triton_kernels"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/gpu-check", help="results.jsonl goes here")
    p.add_argument("--results", default="bench/results", help="where the benchmarks write")
    p.add_argument("--budget-s", type=float, default=460.0)
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (the tests)")
    p.add_argument("--phases", help="comma-separated subset, in the order above")
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") is None:
        import torch

        if not torch.cuda.is_available():  # before any kernel module is imported (read at decoration)
            os.environ["TRITON_INTERPRET"] = "1"
    how = ensure_importable()
    c = Check(args)
    c.record("import", ok=True, how=how)
    wanted = set(args.phases.split(",")) if args.phases else None
    failed = []
    for name, est, est_smoke, fn in PHASES:
        if wanted is not None and name not in wanted:
            continue
        if c.left() < (est_smoke if c.smoke else est):
            c.record(name, ok=None, skipped=f"{c.left():.0f} s left, needs ~{est_smoke if c.smoke else est}")
            continue
        t = time.time()
        try:
            row = fn(c)
        except Exception as exc:  # noqa: BLE001 - a phase's failure is its result
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()[-3000:]}
        row = c.record(name, **({"seconds": round(time.time() - t, 1)} | row))
        if row.get("ok") is False:
            failed.append(name)
    c.record("done", ok=not failed, failed=failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
