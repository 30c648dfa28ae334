"""The harness every benchmark shares: common flags and set-up, timing, the memory floor and
bandwidth achieved, the timed generate loop, and the result writer (JSON + markdown with the
device, versions, command, timestamp and machine load). The last section holds every
non-public decodekit name the benchmarks use. Methodology: bench/README.md."""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- flags and set-up
def parser(prog: str, description: str, models: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark takes (``models``: and the model ones)."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    p.add_argument("--quick", action="store_true", help="few prompts, tokens and repeats")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int,
                   help="torch threads on CPU (default 2; 1 with --smoke; 0: torch's choice)")
    p.add_argument("--out", default="bench/results", help="directory of the result files")
    p.add_argument("--tag", help="suffix of the result files: <area>-<device>-<tag>.{json,md}")
    p.set_defaults(smoke=False)
    if not models:
        return p
    p.add_argument("--smoke", action="store_true",
                   help="the tiny random model (random:tiny) at the smallest sizes (tests)")
    p.add_argument("--model", nargs="+", metavar="M",
                   help="embedded (SmolLM2-135M-Instruct), a local folder / .gguf file, or "
                        "random:smollm2 / random:llama-1b / random:tiny (random init, no files)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--repeats", type=int, help="timed repetitions per point")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens per request")
    return p


def setup(args: argparse.Namespace, default_threads: int = 2) -> torch.device:
    """Device, torch threads, seed, offline hub, quiet transformers; warns on a busy CPU."""
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads if args.threads is not None else (
        0 if dev.type == "cuda" else (1 if args.smoke else default_threads))
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)  # generate_batch's own logger
    load = args.load_avg_start = load_average()
    print(f"device: {device_name(dev)}, {torch.get_num_threads()} torch thread(s), load {load}")
    if dev.type != "cuda" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load} on {os.cpu_count()} cores: CPU timings are noisy",
              file=sys.stderr)
    return dev


def check_tokens(n: int) -> int:
    """``--max-new-tokens`` must leave at least one decode step after prefill."""
    if n < 2:
        raise SystemExit("--max-new-tokens must be >= 2 (the first token is prefill)")
    return n


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """CUDA: ``triton.testing.do_bench(warmup_ms, rep_ms)`` median; CPU: ``warmup`` untimed
    calls, then the median ``time.perf_counter`` wall time of ``repeats`` calls."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup: int = 1
    repeats: int = 5

    def method(self, device: torch.device) -> str:
        if device.type == "cuda":
            return f"triton.testing.do_bench median (warmup {self.warmup_ms} ms, rep {self.rep_ms} ms)"
        return f"time.perf_counter median of {self.repeats} calls after {self.warmup} warm-up"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn: Callable[[], Any], device: torch.device, timing: Timing = Timing()) -> float:
    """Median time of one call of ``fn`` in milliseconds (see :class:`Timing`)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=timing.warmup_ms, rep=timing.rep_ms,
                                             return_mode="median"))
    for _ in range(timing.warmup):
        fn()
    times = []
    for _ in range(max(1, timing.repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(wall seconds, fn())``, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# --------------------------------------------------------------------------- floor and bandwidth
@dataclass(frozen=True)
class Bandwidth:
    """Copy bandwidth of the device: ``2 * nbytes`` (read + write) per ``dst.copy_(src)``."""

    bytes_per_s: float
    nbytes: int
    method: str

    def floor_ms(self, nbytes: float) -> float:
        """Time to read ``nbytes`` once at this bandwidth."""
        return nbytes / self.bytes_per_s * 1e3


def measure_bandwidth(device: torch.device, quick: bool = False) -> Bandwidth:
    """Median time of one copy of 1 GiB (CUDA) / 256 MiB (CPU; 64 MiB with ``quick``)."""
    nbytes = (1 << 30) if device.type == "cuda" else ((64 if quick else 256) << 20)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    timing = Timing(warmup_ms=10, rep_ms=50, warmup=0, repeats=3 if quick else 5)
    ms = bench_ms(lambda: dst.copy_(src), device, timing)
    bw = Bandwidth(2 * nbytes / (ms * 1e-3), nbytes,
                   f"dst.copy_(src) of {nbytes >> 20} MiB, read+write bytes, {timing.method(device)}")
    print(f"copy bandwidth {bw.bytes_per_s / 1e9:.1f} GB/s ({bw.method})")
    return bw


def gb_s(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


# --------------------------------------------------------------------------- timed generate loop
@dataclass
class GenRun:
    """One timed generation: the first ``next_token`` call is prefill, every later one a decode
    step (its wall time in ``step_s``, the requests it advanced in ``active``)."""

    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    contexts: list[Any] = field(default_factory=list)
    per_step: list[Any] = field(default_factory=list)  # what ``on_step`` returned after each step

    @property
    def tokens(self) -> list[list[int]]:
        return [list(c.generated_token_ids) for c in self.contexts]

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def decode_tokens(self) -> int:  # the first token of each request belongs to prefill
        return sum(map(len, self.tokens)) - len(self.contexts)


def timed_generate(gen: Any, prompts: Sequence[list[int]], params: Sequence[Any],
                   device: torch.device, steering: Sequence[Any] | None = None,
                   on_step: Callable[[], Any] | None = None, lora: Sequence[str | None] | None = None
                   ) -> GenRun:
    """Run every prompt through decodekit's own scheduler loop (``continuous_batching``, one
    ``next_token(batch, 1)`` per iteration) and time each call; the first one prefills.
    ``on_step()`` runs after each decode call; its results land in ``per_step``. ``steering``
    / ``lora``: per request (None: none)."""
    from decodekit.engine.scheduler import continuous_batching

    steer = steering or [None] * len(prompts)
    adapters = lora or [None] * len(prompts)
    ctxs = [gen.new_context(p, sp, request_id=f"r{i}", steering=s, lora=a)
            for i, (p, sp, s, a) in enumerate(zip(prompts, params, steer, adapters, strict=True))]
    limit = 4 * max(sp.max_new_tokens for sp in params)
    with contextlib.closing(continuous_batching(gen, ctxs)) as calls:  # releases on exit
        run = GenRun(timed_call(lambda: next(calls), device)[0], contexts=ctxs)
        while active := sum(not c.is_done for c in ctxs):
            run.step_s.append(timed_call(lambda: next(calls), device)[0])
            run.active.append(active)
            if on_step is not None:
                run.per_step.append(on_step())
            if len(run.step_s) > limit:
                raise RuntimeError(f"requests not done after {limit} decode calls")
    return run


@contextlib.contextmanager
def step_clock(model: torch.nn.Module) -> Any:
    """A transformers ``StoppingCriteria`` that never stops and records ``(perf_counter, length)``
    once per step, after the step's tokens are chosen: only the first call after a forward of
    ``model`` counts (transformers 5.17's assisted generation also checks the candidates before
    the step's forward). A context manager: the forward hook is removed on exit."""
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, int]] = []
            self.forwards = self.stamped = 0

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            if self.forwards > self.stamped:
                synchronize(input_ids.device)
                self.stamps.append((time.perf_counter(), input_ids.shape[1]))
                self.stamped = self.forwards
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    clock = StepClock()

    def count(*_: Any) -> None:
        clock.forwards += 1

    handle = model.register_forward_pre_hook(count)
    try:
        yield clock
    finally:
        handle.remove()


def max_seq(prompts: Sequence[list[int]], n: int) -> int:
    """``max_seq_len`` for these prompts and ``n`` new tokens, rounded up to 64."""
    return -(-(max(map(len, prompts)) + n) // 64) * 64


def short_error(exc: BaseException) -> str:
    if os.environ.get("BENCH_TRACEBACK"):
        import traceback

        traceback.print_exc()
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {type(exc).__name__}: {msg}"[:300]


# --------------------------------------------------------------------------- results
def load_average() -> float | None:
    with contextlib.suppress(AttributeError, OSError):
        return round(os.getloadavg()[0], 2)
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        return f"cpu ({cpu.group(1).strip() if cpu else platform.machine()})"
    return f"cpu ({platform.machine()})"


def _version(module: str) -> str | None:
    try:
        return str(getattr(__import__(module), "__version__", "unknown"))
    except Exception:  # not installed or broken: "not available"
        return None


def metadata(device: torch.device, timing_method: str, **extra: Any) -> dict[str, Any]:
    """Device, versions, command, UTC timestamp, threads, load average (now), ``extra``."""
    meta: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "device_slug": "cpu" if device.type != "cuda" else re.sub(
            r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-"),
        "triton": _version("triton"), "transformers": _version("transformers"),
        "decodekit": _version("decodekit"), "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "load_avg_1m": load_average(),
        "command": shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "timing_method": timing_method,
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
    meta.update(extra)
    return meta


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table: first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(headers) + " |", "| :-- |" + " --: |" * (len(headers) - 1)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def f(x: float | None, fmt: str = "{:,.1f}") -> str:
    """``x`` formatted, ``-`` for None."""
    return "-" if x is None else fmt.format(x)


def ratio(x: float | None) -> str:
    return f(x, "{:.2f}x")


def report(area: str, title: str, args: argparse.Namespace, meta: dict[str, Any],
           rows: Sequence[dict[str, Any]], body: Sequence[str]) -> Path:
    """Write ``<out>/<area>-<device>[-smoke][-tag].json`` (``{"metadata", "rows"}``) and the
    markdown (a metadata header, then ``body``); print the markdown."""
    meta["load_avg_1m_start"], meta["load_avg_1m_end"] = args.load_avg_start, load_average()
    suffix = "".join(f"-{re.sub(r'[^A-Za-z0-9_.-]', '-', s)}"
                     for s in ("smoke" if args.smoke else None, args.tag) if s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{area}-{meta['device_slug']}{suffix}"
    head = [
        f"# {title}: {meta['device']}", "",
        f"- command: `{meta['command']}`",
        f"- timestamp: {meta['timestamp']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, triton {meta['triton']}, python {meta['python']}",
        f"- {meta['threads']} torch thread(s), {meta['cpu_count']} cores; 1-minute load average "
        f"{meta['load_avg_1m_start']} at the start, "
        f"{meta['load_avg_1m_end']} at the end",
        f"- timing: {meta['timing_method']}", "- method: bench/README.md", "",
    ]
    md = "\n".join([*head, *body]).rstrip() + "\n"
    stem.with_suffix(".json").write_text(
        json.dumps({"metadata": meta, "rows": list(rows)}, indent=1, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(md)
    print("\n" + md + f"\nwrote {stem}.json and {stem}.md")
    return stem.with_suffix(".json")


# =========================================================================== non-public decodekit
# Every decodekit name outside `import decodekit`'s public API that the benchmarks use lives
# here, one function each, so the library's internal restructuring touches only this section.

def default_model_name() -> str:
    """Name of the embedded model (``decodekit.loading.DEFAULT_MODEL``)."""
    from decodekit.loading import DEFAULT_MODEL

    return DEFAULT_MODEL


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers decodekit hooks (``decodekit.engine.model_adapter.decoder_layers``)."""
    from decodekit.engine.model_adapter import decoder_layers as layers

    return layers(model)


def layer_hook_count(model: torch.nn.Module) -> int:
    """Forward hooks on the decoder layers (torch's ``Module._forward_hooks``)."""
    return sum(len(layer._forward_hooks) for layer in decoder_layers(model))


def steering_presets() -> dict[str, float]:
    """Preset name -> default strength (``decodekit.steering.presets.PRESETS``)."""
    from decodekit.steering.presets import PRESETS

    return {k: p.default_strength for k, p in PRESETS.items()}


def step_stats(gen: Any) -> tuple[float, float, float, int]:
    """``(forward_s, sample_s, total_s, kv_len)`` of ``gen``'s last ``next_token`` call
    (``TokenGenerator.stats``, a ``decodekit.outputs.StepStats``; the slot cache's KV length)."""
    st = gen.stats
    return st.forward_s, st.sample_s, st.total_s, int(gen.runner.cache.kv_len)


def cb_config(page: int, **kw: Any) -> Any:
    """transformers' ``ContinuousBatchingConfig`` with pages of ``page`` tokens (``page_size``
    since transformers 5.2x, ``block_size`` before) and whichever of ``kw`` the installed
    version takes. ``max_batch_tokens`` defaults to transformers 5.2x's 8192, capped at the
    cache's capacity (no step holds more): 5.17 solves it from the free memory when only
    ``num_blocks`` is given (74k tokens on a 24 GiB CPU machine: 22 GB of activation buffers
    for a tiny model, which got the CI job's other processes killed)."""
    import inspect

    from transformers import ContinuousBatchingConfig

    params = inspect.signature(ContinuousBatchingConfig).parameters
    if kw.get("num_blocks") is not None and kw.get("max_batch_tokens") is None:
        kw["max_batch_tokens"] = min(8192, kw["num_blocks"] * page)
    kw["page_size" if "page_size" in params else "block_size"] = page
    return ContinuousBatchingConfig(**{k: v for k, v in kw.items() if k in params})


def kv_blocks_held(gen: Any) -> tuple[int, int]:
    """``(blocks held, bytes per block)`` of ``gen``'s paged KV cache: blocks some request
    holds, parked prefix-cache blocks excluded (``gen.runner.kv.pool``, ``gen.runner.cache``)."""
    kv = gen.runner.kv
    held = kv.pool.num_blocks - 1 - kv.pool.num_usable
    return held, gen.runner.cache.bytes_per_block


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of K and V one position takes over every layer
    (``decodekit.engine.kv_cache.kv_shape``)."""
    from decodekit.engine.kv_cache import kv_shape

    layers, heads, dim = kv_shape(model.config)
    return 2 * layers * heads * dim * next(model.parameters()).element_size()


def forward_alone(gen: Any, batch: int, kv_len: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``(bind, forward)``: one eager model forward, ``batch`` x 1 token over ``kv_len`` positions
    of ``gen``'s slot cache, every input (ids, positions, masks) prepared here and the cache bound
    by ``bind()`` (``gen.runner.cache``, ``gen.adapter``). Its writes land at masked positions of
    slots ``0..batch-1``: run it between generations only."""
    dev, cache, adapter = gen.device, gen.runner.cache, gen.adapter
    q = torch.full((batch, 1), kv_len - 1, dtype=torch.long, device=dev)
    length = torch.full((batch,), kv_len, dtype=torch.long, device=dev)
    x = torch.full((batch, 1), 5, dtype=torch.long, device=dev)
    kw = {adapter.cache_kw: cache, "attention_mask": adapter.masks(q, length, kv_len)}

    @torch.inference_mode()
    def fn() -> Any:
        return gen.model(input_ids=x, position_ids=q, use_cache=True, logits_to_keep=1, **kw)

    return (lambda: cache.bind(0, q, kv_len)), fn


#: Parts of a decode step for the profile tool: (file suffix, function) whose cumulative time it is.
PROFILE_PARTS = {
    "next_token": ("decodekit/engine/generator.py", "next_token"),
    "forward_section": ("decodekit/engine/runner.py", "forward"),
    "masks": ("decodekit/engine/model_adapter.py", "masks"),
    "cache_bind": ("decodekit/engine/kv_cache.py", "bind"),
    "sampler": ("decodekit/sampling/sampler.py", "sample"),
    "eos_detok": ("decodekit/engine/eos.py", "commit"),
}


def mask_fill_us(gen: Any, contexts: Sequence[Any]) -> float:
    """Median microseconds of one bitmask fill for ``contexts`` (``gen.guidance.mask`` over
    their matchers, ``TextGenerationContext.guide``; upload included), of 5."""
    guides = [c.guide for c in contexts]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        gen.guidance.mask(guides)
        synchronize(gen.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6
