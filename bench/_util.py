"""Shared helpers for decodekit's benchmarks (sampler, generate, speculative, steering).

Everything a benchmark needs besides the thing it measures:

* timing: :func:`bench_ms` (``triton.testing.do_bench`` median on CUDA, a
  ``time.perf_counter`` median on CPU) and :class:`Timing` (the knobs of both);
* the memory floor: :func:`measure_copy_bandwidth` (one large ``dst.copy_(src)``,
  read + write bytes) and :func:`floor_ms`;
* inputs: :func:`make_logits` (``flat`` randn or ``peaked`` Zipf-shaped logits);
* metadata and output: :func:`device_name`, :func:`device_slug`, :func:`metadata`,
  :func:`markdown_table`, :func:`write_results`;
* small formatters: :func:`fmt_us`, :func:`fmt_ratio`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "Bandwidth",
    "Timing",
    "bench_ms",
    "device_name",
    "device_slug",
    "floor_ms",
    "load_average",
    "fmt_ratio",
    "fmt_us",
    "make_logits",
    "markdown_table",
    "measure_copy_bandwidth",
    "metadata",
    "pick_device",
    "synchronize",
    "write_results",
]

#: CLI dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


# --------------------------------------------------------------------------- device
def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    """The CPU model from /proc/cpuinfo, else ``platform.processor()``, else the machine."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    """Human-readable device name: the CUDA device name, or ``cpu (<model>)``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()})"


def device_slug(device: torch.device) -> str:
    """File-name slug of the device: e.g. ``nvidia-h100-80gb-hbm3``; ``cpu`` on CPU."""
    if device.type != "cuda":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug or "cuda"


def _version(module: str) -> str | None:
    """``module.__version__`` or None when the module cannot be imported."""
    try:
        mod = __import__(module)
    except Exception:  # any import failure means "not available"
        return None
    return str(getattr(mod, "__version__", "unknown"))


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): CPU timings are only
    meaningful when it is well below the core count."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def metadata(device: torch.device, **extra: Any) -> dict[str, Any]:
    """Run metadata: device, library versions, exact command line, UTC timestamp, ``extra``."""
    meta: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1m": load_average(),
        "command": shlex.join(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["sm_count"] = torch.cuda.get_device_properties(device).multi_processor_count
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Timing:
    """How to time one function.

    On CUDA, ``warmup_ms`` / ``rep_ms`` go to ``triton.testing.do_bench`` (which
    clears L2 before every run and returns the median of CUDA-event times). On CPU,
    ``warmup`` untimed calls are followed by ``repeats`` timed ones, and the median
    wall time (``time.perf_counter``) is returned.
    """

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    warmup: int = 1
    repeats: int = 5


def bench_ms(fn: Callable[[], Any], device: torch.device, timing: Timing = Timing()) -> float:
    """Median time of one call of ``fn`` in milliseconds (see :class:`Timing`)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(
            fn, warmup=timing.warmup_ms, rep=timing.rep_ms, return_mode="median"
        ))
    for _ in range(max(0, timing.warmup)):
        fn()
    times = []
    for _ in range(max(1, timing.repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


# --------------------------------------------------------------------------- memory floor
@dataclass(frozen=True)
class Bandwidth:
    """A measured copy bandwidth: ``bytes_per_s`` counts read + write bytes."""

    bytes_per_s: float
    buffer_bytes: int
    copy_ms: float
    method: str

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gb_per_s"] = self.bytes_per_s / 1e9
        return out


def _copy_ms(device: torch.device, nbytes: int, timing: Timing) -> float:
    """Median time of ``dst.copy_(src)`` for two fresh ``nbytes`` buffers on ``device``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    return bench_ms(lambda: dst.copy_(src), device, timing)


def measure_copy_bandwidth(
    device: torch.device, nbytes: int | None = None, timing: Timing = Timing()
) -> Bandwidth:
    """Time ``dst.copy_(src)`` of ``nbytes`` (default 1 GiB on CUDA, 256 MiB on CPU).

    Bandwidth = ``2 * nbytes`` (one read, one write) over the median copy time.
    """
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    ms = _copy_ms(device, nbytes, timing)
    if device.type == "cuda":
        method = (f"triton.testing.do_bench median of dst.copy_(src), {nbytes / 2**20:.0f} MiB "
                  f"device-to-device, read+write bytes counted")
    else:
        method = (f"time.perf_counter median of a CPU memcpy dst.copy_(src), "
                  f"{nbytes / 2**20:.0f} MiB, {torch.get_num_threads()} thread(s), "
                  f"read+write bytes counted")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the two buffers back
    return Bandwidth(2 * nbytes / (ms * 1e-3), nbytes, ms, method)


def floor_ms(nbytes: int, bw: Bandwidth) -> float:
    """Time to read ``nbytes`` once at the measured copy bandwidth, in milliseconds."""
    return nbytes / bw.bytes_per_s * 1e3


# --------------------------------------------------------------------------- inputs
def make_logits(
    dist: str,
    batch: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    seed: int = 0,
    zipf_s: float = 1.1,
    noise: float = 0.1,
) -> torch.Tensor:
    """Random logits ``[batch, vocab]`` of ``dtype`` on ``device``.

    ``flat``: standard normal (a near-uniform distribution, the worst case for
    top-p). ``peaked``: Zipf-shaped like a real LM head, ``-zipf_s * log(rank)``
    over a random permutation of the vocabulary per row, plus ``noise * randn``;
    with ``zipf_s = 1.1`` the top token holds ~10% of the mass and top-p 0.9 keeps
    ~10^4 tokens of a 128k vocabulary.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    if dist == "flat":
        x = torch.randn(batch, vocab, generator=gen, device=device)
    elif dist == "peaked":
        rank = torch.arange(1, vocab + 1, device=device, dtype=torch.float32)
        perm = torch.rand(batch, vocab, generator=gen, device=device).argsort(dim=-1)
        x = (-zipf_s * torch.log(rank))[perm]
        x = x + noise * torch.randn(batch, vocab, generator=gen, device=device)
    else:
        raise ValueError(f"unknown logits distribution {dist!r} (expected 'flat' or 'peaked')")
    return x.to(dtype).contiguous()


# --------------------------------------------------------------------------- output
def fmt_us(ms: float | None) -> str:
    """Milliseconds as a short microsecond string (``-`` for None)."""
    if ms is None:
        return "-"
    us = ms * 1e3
    if us >= 100:
        return f"{us:,.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def fmt_ratio(r: float | None) -> str:
    """A ratio as ``1.23x`` (``-`` for None)."""
    return "-" if r is None else f"{r:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right)."""
    align = [":--"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def result_stem(area: str, device: torch.device, *suffixes: str | None) -> str:
    """``<area>-<device slug>[-suffix...]`` with each suffix reduced to safe characters."""
    parts = [area, device_slug(device)]
    parts += ["".join(c if c.isalnum() or c in "-_." else "-" for c in x) for x in suffixes if x]
    return "-".join(parts)


def write_results(
    out_dir: str | os.PathLike[str],
    stem: str,
    meta: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    markdown: str,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.json`` (``{"metadata", "rows"}``) and ``<stem>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"metadata": dict(meta), "rows": list(rows)}, f, indent=1, allow_nan=False)
        f.write("\n")
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path


# --------------------------------------------------------------------------- models
def word_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer covering ids ``0 .. vocab_size - 1``, for randomly
    initialised models: id ``i`` is the word ``w{i}``; 0 is ``<pad>``, 1 ``<s>``, 2 ``</s>``.
    Decoding joins words with spaces. Built in-process (no files, no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(3, vocab_size)}
    vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def random_llama(
    dtype: torch.dtype, device: torch.device | str, seed: int = 0, **config: Any
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (``config``: ``LlamaConfig`` fields),
    built on ``device`` and cast to ``dtype``; pad 0, bos 1, eos 2 (see :func:`word_tokenizer`)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw: dict[str, Any] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(config)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**kw))
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = kw["pad_token_id"]
    model.generation_config.eos_token_id = kw["eos_token_id"]
    return model
