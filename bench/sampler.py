"""Sampler benchmark: decodekit's fused sampler against the usual baselines.

For every (setting, logits distribution, dtype, vocabulary V, batch B) it times one
sampling step of ``logits [B, V]`` with

* ``decodekit``: :class:`decodekit.Sampler` on the device (backend ``"triton"`` on
  CUDA: two fused launches; on CPU the Sampler runs its torch reference);
* ``torch_ref``: the same Sampler with ``backend="torch"`` (sort-based reference);
* ``hf_chain``: the transformers processor chain that ``generate()`` would build
  (fp32 copy of the logits, processors, softmax, ``torch.multinomial``; argmax for
  greedy);
* ``flashinfer``: ``flashinfer.sampling.top_k_top_p_sampling_from_logits`` (the
  ``topk_topp`` setting only, when ``import flashinfer`` works; else ``n/a``);
* ``decodekit_interp`` (``--interpret``, CPU only): the Triton kernels in Triton's
  interpreter, at tiny sizes, to exercise the kernel path of the harness.

Each time is a median (``triton.testing.do_bench`` on CUDA, ``time.perf_counter``
on CPU, single-threaded unless ``--threads`` says otherwise). Without CUDA the
default grid is small (B in {1, 8}, V=32000, fp32) and only proves the harness.
Ratios are ``baseline_time / decodekit_time`` (> 1: decodekit is faster). The
floor is one read of the logits (``B * V * itemsize`` bytes) at the measured copy
bandwidth. Results go to ``<out>/sampler-<device-slug>.json`` and ``.md``.

Usage::

    python -m bench.sampler [--quick] [--batch 1 8 ...] [--vocab ...] [--dtype fp32 bf16]
                            [--settings greedy temp topk_topp all] [--dists flat peaked]
                            [--out bench/results] [--interpret] [--device cuda|cpu]
                            [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._util import (
    DTYPES,
    Bandwidth,
    Timing,
    bench_ms,
    device_name,
    device_slug,
    floor_ms,
    fmt_ratio,
    fmt_us,
    load_average,
    make_logits,
    markdown_table,
    measure_copy_bandwidth,
    metadata,
    pick_device,
    synchronize,
    write_results,
)

SETTING_NAMES = ("greedy", "temp", "topk_topp", "all")
DIST_NAMES = ("flat", "peaked")
IMPLS = ("decodekit", "torch_ref", "hf_chain", "flashinfer", "decodekit_interp")
#: Implementations whose failure makes the run exit non-zero.
REQUIRED_IMPLS = ("decodekit", "torch_ref", "hf_chain")

PROMPT_LEN = 256  # prior tokens of the "all" setting: prompt ...
OUTPUT_LEN = 256  # ... plus output tokens committed with Sampler.accept
N_BIAS = 10  # logit_bias entries of the "all" setting
#: Largest B * V run in Triton's interpreter (about a second per call at this size).
INTERPRET_MAX_ELEMS = 8192


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One benchmark setting: decodekit's params and the matching transformers chain."""

    name: str
    description: str
    params: dict[str, Any]
    history: bool = False  # PROMPT_LEN prompt + OUTPUT_LEN accepted tokens per row
    logit_bias: bool = False
    hf: tuple[str, ...] = field(default_factory=tuple)  # processor names, in order


SETTINGS: dict[str, Setting] = {
    "greedy": Setting("greedy", "temperature=0 (argmax)", {"temperature": 0.0}),
    "temp": Setting("temp", "temperature=0.8", {"temperature": 0.8}, hf=("temperature",)),
    "topk_topp": Setting(
        "topk_topp", "top_k=50, top_p=0.9 (temperature 1)",
        {"temperature": 1.0, "top_k": 50, "top_p": 0.9}, hf=("top_k", "top_p"),
    ),
    "all": Setting(
        "all",
        f"temperature 0.8, top_k 50, top_p 0.9, min_p 0.05, typical_p 0.95, repetition 1.1, "
        f"frequency 0.3, presence 0.2, logit_bias of {N_BIAS} tokens, "
        f"{PROMPT_LEN}+{OUTPUT_LEN} prior tokens per row",
        {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
         "repetition_penalty": 1.1, "frequency_penalty": 0.3, "presence_penalty": 0.2},
        history=True, logit_bias=True,
        hf=("sequence_bias", "repetition", "temperature", "top_k", "top_p", "min_p", "typical"),
    ),
}

#: transformers class behind each processor name (for the metadata).
HF_CLASSES = {
    "sequence_bias": "SequenceBiasLogitsProcessor",
    "repetition": "RepetitionPenaltyLogitsProcessor",
    "temperature": "TemperatureLogitsWarper",
    "top_k": "TopKLogitsWarper",
    "top_p": "TopPLogitsWarper",
    "min_p": "MinPLogitsWarper",
    "typical": "TypicalLogitsWarper",
}


def bias_map(vocab: int) -> dict[int, float]:
    """The ``logit_bias`` of the ``all`` setting: ``N_BIAS`` spread-out tokens, +-2."""
    ids = sorted({((i * vocab) // N_BIAS + 7) % vocab for i in range(N_BIAS)})
    return {t: (2.0 if i % 2 == 0 else -2.0) for i, t in enumerate(ids)}


# --------------------------------------------------------------------------- case inputs
@dataclass
class Case:
    """Inputs of one benchmark point (all on the benchmark device)."""

    setting: Setting
    dist: str
    dtype_name: str
    batch: int
    vocab: int
    logits: torch.Tensor
    prompt: torch.Tensor | None  # int64 [B, PROMPT_LEN] (host)
    output: torch.Tensor | None  # int64 [B, OUTPUT_LEN] (device)
    history: torch.Tensor  # int64 [B, L] prompt + output: HF's input_ids
    slots: torch.Tensor  # int32 [B] on the device


def make_case(setting: Setting, dist: str, dtype_name: str, batch: int, vocab: int,
              device: torch.device, seed: int = 0) -> Case:
    """Build logits and token history for one point (deterministic in ``seed``)."""
    logits = make_logits(dist, batch, vocab, DTYPES[dtype_name], device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = output = None
    if setting.history:
        prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=gen)
        out_host = torch.randint(0, vocab, (batch, OUTPUT_LEN), generator=gen)
        history = torch.cat([prompt, out_host], dim=1).to(device)
        output = out_host.to(device)
    else:
        history = torch.randint(0, vocab, (batch, 1), generator=gen).to(device)
    slots = torch.arange(batch, dtype=torch.int32, device=device)
    return Case(setting, dist, dtype_name, batch, vocab, logits, prompt, output, history, slots)


# --------------------------------------------------------------------------- implementations
def decodekit_fn(case: Case, device: torch.device, backend: str) -> tuple[Callable[[], Any], str]:
    """A step of :class:`decodekit.Sampler` with ``backend``; returns (fn, backend used).

    Slots are passed as a device int32 tensor (what a scheduler keeps), so the step
    has no host-to-device copy. Each call commits its token (counts, step counter).
    """
    from decodekit import Sampler, SamplingParams

    kwargs = dict(case.setting.params)
    if case.setting.logit_bias:
        kwargs["logit_bias"] = bias_map(case.vocab)
    params = SamplingParams(**kwargs)
    s = Sampler(case.vocab, case.batch, device, backend=backend, seed=0)
    for b in range(case.batch):
        s.add(b, params.replace(seed=1000 + b), None if case.prompt is None else case.prompt[b])
    if case.output is not None:
        s.accept(list(range(case.batch)), case.output)
    logits, slots = case.logits, case.slots

    def fn() -> torch.Tensor:
        return s.sample(logits, slots).token_ids

    return fn, s.backend


def hf_fn(case: Case) -> Callable[[], Any]:
    """The transformers chain ``generate()`` builds for this setting, then the draw."""
    import transformers as tf

    st, V = case.setting, case.vocab
    p = st.params
    makers: dict[str, Callable[[], Any]] = {
        "sequence_bias": lambda: tf.SequenceBiasLogitsProcessor(
            [[[t], b] for t, b in bias_map(V).items()]),
        "repetition": lambda: tf.RepetitionPenaltyLogitsProcessor(p["repetition_penalty"]),
        "temperature": lambda: tf.TemperatureLogitsWarper(p["temperature"]),
        "top_k": lambda: tf.TopKLogitsWarper(p["top_k"]),
        "top_p": lambda: tf.TopPLogitsWarper(p["top_p"]),
        "min_p": lambda: tf.MinPLogitsWarper(p["min_p"]),
        "typical": lambda: tf.TypicalLogitsWarper(p["typical_p"]),
    }
    procs = tf.LogitsProcessorList([makers[name]() for name in st.hf])
    greedy = p.get("temperature", 1.0) == 0.0
    logits, input_ids = case.logits, case.history

    def fn() -> torch.Tensor:
        # generate() takes an fp32 copy of the last position's logits.
        scores = procs(input_ids, logits.to(dtype=torch.float32, copy=True))
        if greedy:
            return scores.argmax(dim=-1)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)

    return fn


def flashinfer_fn(case: Case) -> Callable[[], Any]:
    """FlashInfer's fused top-k + top-p sampling from logits (raises ImportError if absent)."""
    import flashinfer.sampling as fis

    p = case.setting.params
    logits = case.logits

    def fn() -> torch.Tensor:
        return fis.top_k_top_p_sampling_from_logits(logits, p["top_k"], p["top_p"])

    return fn


# --------------------------------------------------------------------------- running
@dataclass
class Config:
    """Resolved run configuration."""

    device: torch.device
    batches: list[int]
    vocabs: list[int]
    dtypes: list[str]
    settings: list[str]
    dists: list[str]
    timing: Timing
    interpret: bool
    interpret_timing: Timing
    quick: bool
    out: str


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:200]


def time_impl(make: Callable[[], Callable[[], Any]], device: torch.device, timing: Timing,
              optional: bool = False) -> tuple[float | None, str]:
    """Build and time one implementation: (median ms or None, status).

    The status is ``ok``, ``n/a (...)`` for an ImportError of an ``optional`` one
    (FlashInfer), or ``error: ...``.
    """
    try:
        fn = make()
        fn()  # first call: compile / warm caches, and fail here rather than in do_bench
        synchronize(device)
        return bench_ms(fn, device, timing), "ok"
    except ImportError as exc:
        if not optional:
            return None, f"error: {_short(exc)}"
        return None, f"n/a ({_short(exc)})"
    except Exception as exc:
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return None, f"error: {_short(exc)}"


def run_case(case: Case, cfg: Config, bw: Bandwidth) -> dict[str, Any]:
    """Time every applicable implementation on one case; returns the JSON row."""
    dev = cfg.device
    times: dict[str, float | None] = {}
    status: dict[str, str] = {}
    backend_used: dict[str, str] = {}

    def dk(backend: str, key: str) -> Callable[[], Any]:
        def make() -> Callable[[], Any]:
            fn, used = decodekit_fn(case, dev, backend)
            backend_used[key] = used
            return fn
        return make

    dk_backend = "triton" if dev.type == "cuda" else "torch"
    times["decodekit"], status["decodekit"] = time_impl(
        dk(dk_backend, "decodekit"), dev, cfg.timing)
    times["torch_ref"], status["torch_ref"] = time_impl(
        dk("torch", "torch_ref"), dev, cfg.timing)
    times["hf_chain"], status["hf_chain"] = time_impl(
        lambda: hf_fn(case), dev, cfg.timing)
    if case.setting.name != "topk_topp":
        times["flashinfer"], status["flashinfer"] = None, "n/a (topk_topp setting only)"
    elif dev.type != "cuda":
        times["flashinfer"], status["flashinfer"] = None, "n/a (needs CUDA)"
    else:
        times["flashinfer"], status["flashinfer"] = time_impl(
            lambda: flashinfer_fn(case), dev, cfg.timing, optional=True)
    if cfg.interpret:
        if case.batch * case.vocab > INTERPRET_MAX_ELEMS:
            times["decodekit_interp"] = None
            status["decodekit_interp"] = f"n/a (B*V > {INTERPRET_MAX_ELEMS} in the interpreter)"
        else:
            times["decodekit_interp"], status["decodekit_interp"] = time_impl(
                dk("triton", "decodekit_interp"), dev, cfg.interpret_timing)

    base = times["decodekit"]
    ratios = {k: (None if (t is None or not base or k == "decodekit") else t / base)
              for k, t in times.items()}
    nbytes = case.batch * case.vocab * case.logits.element_size()
    floor = floor_ms(nbytes, bw)
    return {
        "setting": case.setting.name,
        "dist": case.dist,
        "dtype": case.dtype_name,
        "batch": case.batch,
        "vocab": case.vocab,
        "logits_bytes": nbytes,
        "floor_us": floor * 1e3,
        "times_us": {k: (None if t is None else t * 1e3) for k, t in times.items()},
        "ratios": ratios,
        "decodekit_over_floor": None if base is None else base / floor,
        "status": status,
        "backend": backend_used,
    }


def format_row_line(row: dict[str, Any]) -> str:
    """One console line for a finished row."""
    t, r, st = row["times_us"], row["ratios"], row["status"]
    head = (f"{row['setting']:<9} {row['dist']:<6} {row['dtype']:<4} B={row['batch']:<4} "
            f"V={row['vocab']:<7} floor {fmt_us(row['floor_us'] / 1e3):>7} us")
    parts = []
    for k in IMPLS:
        if k not in t:
            continue
        if t[k] is None:
            parts.append(f"{k} {st[k]}")
        elif k == "decodekit":
            parts.append(f"{k} {fmt_us(t[k] / 1e3)} us ({row['decodekit_over_floor']:.1f}x floor)")
        else:
            parts.append(f"{k} {fmt_us(t[k] / 1e3)} us ({fmt_ratio(r[k])})")
    return head + " | " + " | ".join(parts)


def _cell(row: dict[str, Any], impl: str) -> str:
    t = row["times_us"].get(impl)
    if t is None:
        st = row["status"].get(impl, "n/a")
        return "n/a" if st.startswith("n/a") else "error"
    if impl == "decodekit":
        return fmt_us(t / 1e3)
    return f"{fmt_us(t / 1e3)} ({fmt_ratio(row['ratios'][impl])})"


def render_markdown(
    meta: dict[str, Any], rows: Sequence[dict[str, Any]], impls: Sequence[str]
) -> str:
    """The markdown report: metadata, the floor, notes and one table row per case."""
    bw = meta["copy_bandwidth"]
    lines = [
        f"# Sampler benchmark: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- timestamp: {meta['timestamp']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, transformers {meta['transformers']}, "
        f"flashinfer {meta['flashinfer'] or 'n/a'}, python {meta['python']}",
        f"- timing: {meta['timing_method']}",
        f"- 1-minute load average: {meta['load_avg_1m']} at the start, "
        f"{meta['load_avg_1m_end']} at the end ({meta['cpu_count']} cores)",
        f"- floor: one read of the logits (B*V*itemsize) at {bw['gb_per_s']:.1f} GB/s, "
        f"measured as {bw['method']}",
        f"- decodekit backend: {meta['decodekit_backend']}",
        "- ratios in parentheses: baseline time / decodekit time (> 1: decodekit faster)",
        "- HF chain per setting (then softmax + torch.multinomial; argmax for greedy): "
        + "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in meta["hf_chain"].items()),
        "- the HF chain has no frequency/presence penalties, so in `all` it does less work",
        "",
    ]
    if meta["device_type"] != "cuda":
        lines += ["On CPU the decodekit Sampler runs the torch reference itself, so "
                  "`torch ref` vs `decodekit` is the same code (ratio ~1, noise).", ""]
    names = {"decodekit": "decodekit us", "torch_ref": "torch ref us", "hf_chain": "HF chain us",
             "flashinfer": "FlashInfer us", "decodekit_interp": "Triton interp us"}
    headers = ["setting", "logits", "dtype", "B", "V", "floor us", "x floor"]
    headers += [names[k] for k in impls]
    table = []
    for row in rows:
        over = row["decodekit_over_floor"]
        table.append([row["setting"], row["dist"], row["dtype"], row["batch"], row["vocab"],
                      fmt_us(row["floor_us"] / 1e3), "-" if over is None else f"{over:.1f}"]
                     + [_cell(row, k) for k in impls])
    return "\n".join(lines) + markdown_table(headers, table)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sampler",
        description="Time one sampling step: decodekit vs torch reference vs transformers "
                    "vs FlashInfer, against the memory floor.",
    )
    p.add_argument("--quick", action="store_true",
                   help="fewer/shorter timing runs and (unless sizes are given) a small grid")
    p.add_argument("--batch", type=int, nargs="+", metavar="B", help="batch sizes")
    p.add_argument("--vocab", type=int, nargs="+", metavar="V", help="vocabulary sizes")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="logits dtypes")
    p.add_argument("--settings", nargs="+", choices=SETTING_NAMES, help="sampling settings")
    p.add_argument("--dists", nargs="+", choices=DIST_NAMES, help="logits distributions")
    p.add_argument("--out", default="bench/results", help="directory for the JSON/markdown files")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads; default 1 on CPU (multi-threaded CPU timings "
                        "stall on a shared machine), torch's own choice on CUDA; 0: torch's "
                        "own choice")
    p.add_argument("--interpret", action="store_true",
                   help="CPU only: also run the Triton kernels in Triton's interpreter "
                        f"(very slow; cases with B*V <= {INTERPRET_MAX_ELEMS})")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults per device: the full grid on CUDA, a small proof-of-harness grid on CPU."""
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        batches, vocabs, dtypes = [1, 8, 64, 256], [32000, 128256, 151936], ["fp32", "bf16"]
        if args.quick:
            batches, vocabs, dtypes = [1, 64], [128256], ["bf16"]
        timing = Timing(warmup_ms=5, rep_ms=25) if args.quick else Timing(warmup_ms=25, rep_ms=100)
    else:
        batches, vocabs, dtypes = [1, 8], [32000], ["fp32"]
        if args.interpret:
            batches, vocabs = [1, 2], [2048]
        # time_impl's first (checked) call is the warmup.
        timing = Timing(warmup=0, repeats=3 if args.quick else 5)
    return Config(
        device=dev,
        batches=args.batch or batches,
        vocabs=args.vocab or vocabs,
        dtypes=args.dtype or dtypes,
        settings=args.settings or list(SETTING_NAMES),
        dists=args.dists or list(DIST_NAMES),
        timing=timing,
        interpret=bool(args.interpret) and not cuda,
        interpret_timing=Timing(warmup=0, repeats=1 if args.quick else 2),
        quick=bool(args.quick),
        out=args.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    dev = cfg.device
    if args.interpret and dev.type == "cuda":
        print("--interpret is ignored on CUDA (the compiled kernels run instead)", file=sys.stderr)
    if cfg.interpret:
        # Read when decodekit.kernels is first imported (lazily, by Sampler.sample).
        os.environ["TRITON_INTERPRET"] = "1"
    threads = args.threads if args.threads is not None else (0 if dev.type == "cuda" else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)

    print(f"device: {device_name(dev)}")
    load = load_average()
    if dev.type != "cuda" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: 1-minute load average {load} on {os.cpu_count()} cores; CPU timings "
              "will be noisy", file=sys.stderr)
    bw = measure_copy_bandwidth(
        dev, None if (dev.type == "cuda" or not cfg.quick) else (64 << 20), cfg.timing)
    print(f"floor: one read of B*V*itemsize bytes at {bw.bytes_per_s / 1e9:.1f} GB/s, "
          f"measured as {bw.method} ({bw.copy_ms:.3f} ms per copy)")
    try:
        import flashinfer  # noqa: F401

        fi_version: str | None = str(getattr(flashinfer, "__version__", "unknown"))
    except ImportError:
        fi_version = None
    if dev.type == "cuda":
        timing_method = (f"triton.testing.do_bench(warmup={cfg.timing.warmup_ms}, "
                         f"rep={cfg.timing.rep_ms}, return_mode='median'), L2 cleared per run")
    else:
        timing_method = (f"time.perf_counter median of {cfg.timing.repeats} calls after "
                         f"{1 + cfg.timing.warmup} warmup call(s), {torch.get_num_threads()} "
                         f"torch thread(s)")
    meta = metadata(
        dev,
        flashinfer=fi_version,
        timing_method=timing_method,
        copy_bandwidth=bw.as_dict(),
        decodekit_backend=("triton (fused Triton kernels)" if dev.type == "cuda"
                           else "torch (Sampler's CPU path is the torch reference)"),
        interpret=cfg.interpret,
        config={"batch": cfg.batches, "vocab": cfg.vocabs, "dtype": cfg.dtypes,
                "settings": cfg.settings, "dists": cfg.dists, "quick": cfg.quick},
        settings={k: SETTINGS[k].description for k in cfg.settings},
        hf_chain={k: [HF_CLASSES[n] for n in SETTINGS[k].hf] for k in cfg.settings},
        prior_tokens={"prompt": PROMPT_LEN, "output_accepted": OUTPUT_LEN},
        peaked_logits="-1.1 * log(rank) over a random permutation + 0.1 * randn",
    )

    rows: list[dict[str, Any]] = []
    failed = False
    for name in cfg.settings:
        for dist in cfg.dists:
            for dtype_name in cfg.dtypes:
                for vocab in cfg.vocabs:
                    for batch in cfg.batches:
                        case = make_case(SETTINGS[name], dist, dtype_name, batch, vocab, dev)
                        row = run_case(case, cfg, bw)
                        rows.append(row)
                        print(format_row_line(row), flush=True)
                        failed |= any(row["status"][k].startswith("error")
                                      for k in REQUIRED_IMPLS)
                        del case
                        gc.collect()
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()

    impls = [k for k in IMPLS if any(k in r["times_us"] for r in rows)]
    if dev.type != "cuda":
        impls = [k for k in impls if k != "flashinfer"]
    meta["load_avg_1m_end"] = load_average()
    md = render_markdown(meta, rows, impls)
    stem = f"sampler-{device_slug(dev)}" + ("-interpret" if cfg.interpret else "")
    json_path, md_path = write_results(cfg.out, stem, meta, rows, md)
    print()
    print(md)
    print(f"wrote {json_path} and {md_path}")
    if failed:
        print("some required implementations failed (see status above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
