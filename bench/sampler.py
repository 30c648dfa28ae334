"""Sampler benchmark: one sampling step of ``logits [B, V]`` with decodekit's :class:`~decodekit.Sampler`
against its torch reference, the transformers processor chain and FlashInfer, next to the floor
(one read of the logits at the measured copy bandwidth). Method: bench/README.md.

Usage: ``python -m bench.sampler [--quick] [--batch B..] [--vocab V..] [--dtype fp32 bf16]
[--settings ..] [--dists flat peaked] [--interpret] [--device D] [--threads N] [--out DIR]``
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _harness as H

PROMPT_LEN = OUTPUT_LEN = 256  # prior tokens of the "all" setting: prompt + accepted output
N_BIAS = 10  # logit_bias entries of the "all" setting
INTERPRET_MAX_ELEMS = 8192  # largest B * V run in Triton's interpreter
IMPLS = ("decodekit", "torch_ref", "hf_chain", "flashinfer", "decodekit_interp")
REQUIRED = ("decodekit", "torch_ref", "hf_chain")  # a failure of these fails the run
HF_CLASSES = {"sequence_bias": "SequenceBiasLogitsProcessor",
              "repetition": "RepetitionPenaltyLogitsProcessor",
              "temperature": "TemperatureLogitsWarper", "top_k": "TopKLogitsWarper",
              "top_p": "TopPLogitsWarper", "min_p": "MinPLogitsWarper",
              "typical": "TypicalLogitsWarper"}


@dataclass(frozen=True)
class Setting:
    """decodekit's params, whether rows carry history / logit_bias, and the matching HF chain."""

    description: str
    params: dict[str, Any]
    hf: tuple[str, ...] = ()
    history: bool = False


SETTINGS: dict[str, Setting] = {
    "greedy": Setting("temperature=0 (argmax)", {"temperature": 0.0}),
    "temp": Setting("temperature=0.8", {"temperature": 0.8}, ("temperature",)),
    "topk_topp": Setting("top_k=50, top_p=0.9 (temperature 1)",
                         {"temperature": 1.0, "top_k": 50, "top_p": 0.9}, ("top_k", "top_p")),
    "all": Setting(
        f"temperature 0.8, top_k 50, top_p 0.9, min_p 0.05, typical_p 0.95, repetition 1.1, "
        f"frequency 0.3, presence 0.2, logit_bias of {N_BIAS} tokens, {PROMPT_LEN}+{OUTPUT_LEN} "
        "prior tokens per row",
        {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
         "repetition_penalty": 1.1, "frequency_penalty": 0.3, "presence_penalty": 0.2},
        ("sequence_bias", "repetition", "temperature", "top_k", "top_p", "min_p", "typical"), True),
}


def bias_map(vocab: int) -> dict[int, float]:
    """The ``all`` setting's logit_bias: ``N_BIAS`` spread-out tokens, +-2."""
    ids = sorted({((i * vocab) // N_BIAS + 7) % vocab for i in range(N_BIAS)})
    return {t: (2.0 if i % 2 == 0 else -2.0) for i, t in enumerate(ids)}


def make_logits(dist: str, batch: int, vocab: int, dtype: torch.dtype, device: torch.device,
                seed: int = 0) -> torch.Tensor:
    """``flat``: randn (worst case for top-p). ``peaked``: ``-1.1 * log(rank)`` over a random
    permutation per row + ``0.1 * randn`` (Zipf-like, as a real LM head)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if dist == "flat":
        x = torch.randn(batch, vocab, generator=gen, device=device)
    else:
        rank = torch.arange(1, vocab + 1, device=device, dtype=torch.float32)
        perm = torch.rand(batch, vocab, generator=gen, device=device).argsort(dim=-1)
        x = (-1.1 * torch.log(rank))[perm] + 0.1 * torch.randn(batch, vocab, generator=gen,
                                                                device=device)
    return x.to(dtype).contiguous()


@dataclass
class Case:
    name: str
    dist: str
    dtype: str
    setting: Setting
    batch: int
    vocab: int
    logits: torch.Tensor  # [B, V]
    prompt: torch.Tensor | None  # int64 [B, PROMPT_LEN], host
    output: torch.Tensor | None  # int64 [B, OUTPUT_LEN]
    history: torch.Tensor  # int64 [B, L]: HF's input_ids


def make_case(name: str, dist: str, dtype: str, batch: int, vocab: int, dev: torch.device) -> Case:
    st = SETTINGS[name]
    logits = make_logits(dist, batch, vocab, H.DTYPES[dtype], dev)
    gen = torch.Generator().manual_seed(1)
    prompt = output = None
    history = torch.randint(0, vocab, (batch, 1), generator=gen).to(dev)
    if st.history:
        prompt = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=gen)
        out = torch.randint(0, vocab, (batch, OUTPUT_LEN), generator=gen)
        history, output = torch.cat([prompt, out], dim=1).to(dev), out.to(dev)
    return Case(name, dist, dtype, st, batch, vocab, logits, prompt, output, history)


def decodekit_fn(c: Case, dev: torch.device, backend: str) -> Callable[[], Any]:
    """A step of :class:`decodekit.Sampler` (slots as a device int32 tensor, as a scheduler keeps)."""
    s, slots = make_sampler(c, dev, backend)
    return lambda: s.sample(c.logits, slots).token_ids


def make_sampler(c: Case, dev: torch.device, backend: str) -> tuple[Any, torch.Tensor]:
    from decodekit import Sampler, SamplingParams

    params = SamplingParams(**c.setting.params,
                            **({"logit_bias": bias_map(c.vocab)} if c.setting.history else {}))
    s = Sampler(c.vocab, c.batch, dev, backend=backend, seed=0)
    for b in range(c.batch):
        s.add(b, params.replace(seed=1000 + b), None if c.prompt is None else c.prompt[b])
    if c.output is not None:
        s.accept(list(range(c.batch)), c.output)
    return s, torch.arange(c.batch, dtype=torch.int32, device=dev)


def kernel_passes(c: Case, dev: torch.device) -> dict[str, Any]:
    """Passes over each row (max over the batch) counted by the kernels, banded and with the
    pivot search alone, and the bytes per row they move: the first pass reads the logits and
    writes the fp32 processed row when later passes need it; later passes read that row."""
    s, slots = make_sampler(c, dev, "triton")
    out: dict[str, Any] = {}
    for name, banded in (("banded", True), ("pivot", False)):
        n = int(s.passes(c.logits, slots, banded=banded)[1].max())
        later = 4 * c.vocab * (n - 1)
        out[name] = {"passes": n, "bytes_per_row": c.vocab * c.logits.element_size()
                     + (4 * c.vocab if n > 1 else 0) + later}
    return out


def hf_fn(c: Case) -> Callable[[], Any]:
    """The processor chain ``generate()`` builds for the setting on an fp32 copy, then the draw."""
    import transformers as tf

    p = c.setting.params
    make = {"sequence_bias": lambda: tf.SequenceBiasLogitsProcessor(
                [[[t], b] for t, b in bias_map(c.vocab).items()]),
            "repetition": lambda: tf.RepetitionPenaltyLogitsProcessor(p["repetition_penalty"]),
            "temperature": lambda: tf.TemperatureLogitsWarper(p["temperature"]),
            "top_k": lambda: tf.TopKLogitsWarper(p["top_k"]),
            "top_p": lambda: tf.TopPLogitsWarper(p["top_p"]),
            "min_p": lambda: tf.MinPLogitsWarper(p["min_p"]),
            "typical": lambda: tf.TypicalLogitsWarper(p["typical_p"])}
    procs = tf.LogitsProcessorList([make[n]() for n in c.setting.hf])
    greedy = p["temperature"] == 0.0

    def fn() -> torch.Tensor:
        scores = procs(c.history, c.logits.to(dtype=torch.float32, copy=True))
        if greedy:
            return scores.argmax(dim=-1)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return fn


def flashinfer_fn(c: Case) -> Callable[[], Any]:
    import flashinfer.sampling as fis

    p = c.setting.params
    return lambda: fis.top_k_top_p_sampling_from_logits(c.logits, p["top_k"], p["top_p"])


def time_impl(make: Callable[[], Callable[[], Any]], dev: torch.device, timing: H.Timing,
              optional: bool = False) -> tuple[float | None, str]:
    """(median ms or None, status): ``ok``, ``n/a (...)`` for an optional ImportError, ``error: ...``."""
    try:
        fn = make()
        fn()  # compile / warm caches, and fail here rather than inside the timer
        H.synchronize(dev)
        return H.bench_ms(fn, dev, timing), "ok"
    except ImportError as exc:
        return None, (f"n/a ({exc})"[:200] if optional else H.short_error(exc))
    except Exception as exc:
        return None, H.short_error(exc)


def run_case(c: Case, dev: torch.device, timing: H.Timing, interpret: bool,
             bw: H.Bandwidth) -> dict[str, Any]:
    """Time every implementation on one case; the JSON row."""
    res = {"decodekit": time_impl(lambda: decodekit_fn(c, dev, "triton" if dev.type == "cuda"
                                                       else "torch"), dev, timing),
           "torch_ref": time_impl(lambda: decodekit_fn(c, dev, "torch"), dev, timing),
           "hf_chain": time_impl(lambda: hf_fn(c), dev, timing)}
    if c.name != "topk_topp" or dev.type != "cuda":
        res["flashinfer"] = (None, "n/a (CUDA, topk_topp setting only)")
    else:
        res["flashinfer"] = time_impl(lambda: flashinfer_fn(c), dev, timing, optional=True)
    if interpret:
        res["decodekit_interp"] = (
            time_impl(lambda: decodekit_fn(c, dev, "triton"), dev, H.Timing(warmup=0, repeats=1))
            if c.batch * c.vocab <= INTERPRET_MAX_ELEMS else (None, "n/a (B*V too large)"))
    passes = kernel_passes(c, dev) if dev.type == "cuda" or (
        interpret and c.batch * c.vocab <= INTERPRET_MAX_ELEMS) else None
    times = {k: v[0] for k, v in res.items()}
    base, nbytes = times["decodekit"], c.batch * c.vocab * c.logits.element_size()
    floor = bw.floor_ms(nbytes)
    return {"setting": c.name, "dist": c.dist, "dtype": c.dtype, "batch": c.batch, "vocab": c.vocab,
            "logits_bytes": nbytes, "floor_us": floor * 1e3,
            "times_us": {k: None if t is None else t * 1e3 for k, t in times.items()},
            "ratios": {k: None if t is None or not base or k == "decodekit" else t / base
                       for k, t in times.items()},
            "decodekit_over_floor": None if base is None else base / floor, "passes": passes,
            "status": {k: v[1] for k, v in res.items()}}


def passes_only(args: Any, dev: torch.device) -> int:
    """``--passes``: the kernels' pass counts and bytes per row at B=1 and real vocabularies
    (in Triton's interpreter on CPU), banded vs pivot search; no timing."""
    rows = []
    for name in args.settings or [k for k in SETTINGS if k != "greedy"]:
        for dist in args.dists or ["flat", "peaked"]:
            for vocab in args.vocab or [32000, 128256, 151936]:
                c = make_case(name, dist, "bf16", 1, vocab, dev)
                rows.append({"setting": name, "dist": dist, "vocab": vocab, **kernel_passes(c, dev)})
                print(f"{name:<9} {dist:<6} V={vocab:<7} banded {rows[-1]['banded']} | pivot "
                      f"{rows[-1]['pivot']}", flush=True)
    body = ["- bf16 logits, B=1; bytes per row: one read of the logits, the fp32 processed row written "
            "when later passes read it, and one read of it per later pass", "",
            H.table(["setting", "logits", "V", "passes", "bytes/row", "pivot passes", "pivot bytes/row"],
                    [[r["setting"], r["dist"], r["vocab"], r["banded"]["passes"],
                      r["banded"]["bytes_per_row"], r["pivot"]["passes"], r["pivot"]["bytes_per_row"]]
                     for r in rows])]
    H.report("sampler-passes", "Sampler passes over the row", args, H.metadata(dev, "pass counters"),
             rows, body)
    return 0


def cell(row: dict[str, Any], impl: str) -> str:
    t = row["times_us"].get(impl)
    if t is None:
        return "n/a" if row["status"].get(impl, "n/a").startswith("n/a") else "error"
    return H.f(t) if impl == "decodekit" else f"{H.f(t)} ({H.ratio(row['ratios'][impl])})"


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.sampler", "Time one sampling step: decodekit vs its torch reference vs "
                 "the transformers chain vs FlashInfer, against the memory floor.", models=False)
    p.add_argument("--batch", type=int, nargs="+", metavar="B")
    p.add_argument("--vocab", type=int, nargs="+", metavar="V")
    p.add_argument("--dtype", nargs="+", choices=sorted(H.DTYPES))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--dists", nargs="+", choices=("flat", "peaked"))
    p.add_argument("--interpret", action="store_true",
                   help="CPU: also run the Triton kernels in Triton's interpreter (tiny sizes)")
    p.add_argument("--passes", action="store_true", help="only count the kernels' passes (B=1; "
                   "the interpreter on CPU)")
    args = p.parse_args(argv)
    if args.passes and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    dev = H.setup(args, default_threads=1)
    if args.passes:
        return passes_only(args, dev)
    cuda = dev.type == "cuda"
    interpret = args.interpret and not cuda
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when decodekit first imports its kernels
    if cuda:
        grid = ([1, 64], [128256], ["bf16"]) if args.quick else (
            [1, 8, 64, 256], [32000, 128256, 151936], ["fp32", "bf16"])
        timing = H.Timing(warmup_ms=5, rep_ms=25) if args.quick else H.Timing()
    else:
        grid = ([1, 2], [2048], ["fp32"]) if interpret else ([1, 8], [32000], ["fp32"])
        timing = H.Timing(warmup=0, repeats=3 if args.quick else 5)  # the checked call warms up
    batches, vocabs, dtypes = args.batch or grid[0], args.vocab or grid[1], args.dtype or grid[2]
    settings, dists = args.settings or list(SETTINGS), args.dists or ["flat", "peaked"]
    bw = H.measure_bandwidth(dev, quick=args.quick)
    try:
        import flashinfer

        fi_version: str | None = str(getattr(flashinfer, "__version__", "unknown"))
    except ImportError:
        fi_version = None
    meta = H.metadata(
        dev, timing.method(dev) + ("; L2 cleared per run" if cuda else ""), flashinfer=fi_version,
        copy_bandwidth={"bytes_per_s": bw.bytes_per_s, "gb_per_s": bw.bytes_per_s / 1e9,
                        "method": bw.method},
        decodekit_backend="triton (fused kernels)" if cuda else "torch (the CPU path is the reference)",
        config={"batch": batches, "vocab": vocabs, "dtype": dtypes, "settings": settings,
                "dists": dists, "quick": args.quick, "interpret": interpret},
        settings={k: SETTINGS[k].description for k in settings},
        hf_chain={k: [HF_CLASSES[n] for n in SETTINGS[k].hf] for k in settings})
    rows: list[dict[str, Any]] = []
    for name in settings:
        for dist in dists:
            for dtype in dtypes:
                for vocab in vocabs:
                    for batch in batches:
                        row = run_case(make_case(name, dist, dtype, batch, vocab, dev), dev,
                                       timing, interpret, bw)
                        rows.append(row)
                        print(f"{name:<9} {dist:<6} {dtype} B={batch:<4} V={vocab:<7} floor "
                              f"{row['floor_us']:.2f} us | " + " | ".join(
                                  f"{k} {cell(row, k)}" for k in row["times_us"]), flush=True)
                        gc.collect()
    impls = [k for k in IMPLS if any(r["times_us"].get(k) is not None for r in rows)
             or (k == "flashinfer" and cuda)]
    names = {"decodekit": "decodekit us", "torch_ref": "torch ref us", "hf_chain": "HF chain us",
             "flashinfer": "FlashInfer us", "decodekit_interp": "Triton interp us"}
    body = [
        f"- floor: one read of the logits (B*V*itemsize) at {bw.bytes_per_s / 1e9:.1f} GB/s "
        f"({bw.method}); x floor = decodekit time / floor",
        f"- decodekit backend: {meta['decodekit_backend']}; FlashInfer {fi_version or 'n/a'}",
        "- in parentheses: baseline time / decodekit time (> 1: decodekit faster)",
        "- HF chain (then softmax + torch.multinomial; argmax for greedy): " + "; ".join(
            f"{k}: {', '.join(v) or 'none'}" for k, v in meta["hf_chain"].items()), "",
        H.table(["setting", "logits", "dtype", "B", "V", "floor us", "x floor", "passes (pivot)",
                 *[names[k] for k in impls]],
                [[r["setting"], r["dist"], r["dtype"], r["batch"], r["vocab"], H.f(r["floor_us"], "{:.2f}"),
                  H.f(r["decodekit_over_floor"]), "-" if not r["passes"] else
                  f"{r['passes']['banded']['passes']} ({r['passes']['pivot']['passes']})",
                  *[cell(r, k) for k in impls]] for r in rows])]
    H.report("sampler" + ("-interpret" if interpret else ""), "Sampler benchmark", args, meta,
             rows, body)
    return 1 if any(r["status"][k].startswith("error") for r in rows for k in REQUIRED) else 0


if __name__ == "__main__":
    sys.exit(main())
