"""``decodekit`` command line.

``decodekit generate "PROMPT"`` streams text from a model (default: the embedded
SmolLM2-135M-Instruct) and ends with one summary line. ``decodekit demo`` runs the
batched sampler on a realistic (Zipf-shaped) next-token
distribution with one request per setting in a single batch, and checks the draws
against the processed distribution with a chi-square test.

May call: :mod:`decodekit.llm`'s layers below it (loading, the engine and its scheduler,
the drafter and steering configs, the sampler for the demo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .params import SamplingParams
from .sampling import Sampler
from .structured.spec import GuidedDecodingParams

DEMO_SETTINGS: list[tuple[str, SamplingParams]] = [
    ("greedy", SamplingParams(temperature=0.0)),
    ("temperature=0.7", SamplingParams(temperature=0.7, seed=1)),
    ("top_k=40", SamplingParams(top_k=40, seed=2)),
    ("top_p=0.9", SamplingParams(top_p=0.9, seed=3)),
    ("min_p=0.05", SamplingParams(min_p=0.05, seed=4)),
    ("typical_p=0.9", SamplingParams(typical_p=0.9, seed=5)),
    ("repetition=1.3 frequency=0.5", SamplingParams(repetition_penalty=1.3,
                                                    frequency_penalty=0.5, seed=6)),
    ("everything", SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02,
                                  typical_p=0.95, repetition_penalty=1.1, presence_penalty=0.3,
                                  logit_bias={7: 2.0}, bad_words_token_ids=[[0]], seed=7)),
]


CHECK_VOCAB = 1000  # the exactness check's vocabulary (one slot per draw)
MAX_LAYERS = 4096  # layer indices accepted on the command line


def zipf_logits(vocab_size: int, exponent: float = 1.1, seed: int = 0) -> torch.Tensor:
    """A realistic next-token distribution: probability ~ rank^-exponent, shuffled."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, vocab_size + 1, dtype=torch.float32)
    logits = -exponent * torch.log(rank) + 0.05 * torch.randn(vocab_size, generator=g)
    logits[0] = logits[0] + 0.0  # token 0 keeps the top rank: bad_words bans it in one row
    return logits


def _entropy_bits(p: torch.Tensor) -> float:
    nz = p[p > 0]
    return float(-(nz * nz.log2()).sum())


def run_demo(vocab_size: int, steps: int, draws: int, device: str | None, backend: str) -> int:
    sampler = Sampler(vocab_size, len(DEMO_SETTINGS), device, backend=backend)
    dev = sampler.device
    prompt = list(range(1, 30))
    for slot, (_, params) in enumerate(DEMO_SETTINGS):
        sampler.add(slot, params, prompt)
    slots = list(range(len(DEMO_SETTINGS)))
    row = zipf_logits(vocab_size).to(dev)
    logits = row.expand(len(slots), vocab_size).contiguous()
    probs = sampler.probs(logits, slots).cpu()
    print(f"decodekit sampler demo: backend={sampler.backend} device={dev} V={vocab_size}")
    print("one batch, one request per setting, Zipf-shaped logits (p ~ rank^-1.1)\n")
    print(f"{'slot':>4}  {'settings':<30} {'kept':>6} {'H(bits)':>8}  tokens ({steps} steps)")
    t0 = time.perf_counter()
    drawn = torch.stack([sampler.sample(logits, slots).token_ids for _ in range(steps)], 1).cpu()
    dt = time.perf_counter() - t0
    for slot, (name, _) in enumerate(DEMO_SETTINGS):
        kept = int((probs[slot] > 0).sum())
        toks = " ".join(str(t) for t in drawn[slot].tolist())
        print(f"{slot:>4}  {name:<30} {kept:>6} {_entropy_bits(probs[slot]):>8.2f}  {toks}")
    print(f"\n{steps} steps x {len(slots)} rows in {dt * 1e3:.1f} ms "
          f"({dt / steps * 1e6:.0f} us/step incl. Python)")
    return _exactness_check(CHECK_VOCAB, draws, dev, backend, zipf_logits(CHECK_VOCAB).to(dev))


def _exactness_check(vocab_size: int, draws: int, dev, backend: str, row: torch.Tensor) -> int:
    """Chi-square of ``draws`` seeded draws (one slot each) against the processed top_p row."""
    params = [SamplingParams(top_p=0.9, temperature=0.9, seed=s) for s in range(draws)]
    batch = min(draws, 2048)
    s = Sampler(vocab_size, batch, dev, backend=backend)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    expected = None
    for start in range(0, draws, batch):
        n = min(batch, draws - start)
        for i in range(n):
            s.add(i, params[start + i])
        x = row.expand(n, vocab_size).contiguous()
        if expected is None:
            expected = s.probs(x[:1], [0])[0].double().cpu()
        counts += torch.bincount(s.sample(x, list(range(n))).token_ids.cpu(),
                                 minlength=vocab_size).double()
        for i in range(n):
            s.remove(i)
    exp = expected * draws
    big = exp >= 5
    obs_b, exp_b = counts[big], exp[big]
    rest_o, rest_e = counts[~big].sum(), exp[~big].sum()
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    dof = int(big.sum()) - 1
    if rest_e > 0:
        chi2 += float((rest_o - rest_e) ** 2 / rest_e)
        dof += 1
    z = (chi2 - dof) / math.sqrt(2 * max(dof, 1))
    outside = int(counts[expected == 0].sum())
    ok = abs(z) < 4.5 and outside == 0
    print(f"exactness: {draws} seeded draws (V={vocab_size}, top_p=0.9, T=0.9) vs the processed "
          "distribution: "
          f"chi2={chi2:.1f} dof={dof} (z={z:+.2f}), draws outside the kept set: {outside} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def _unit(name: str, lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (lo < v <= hi if lo_open else lo <= v <= hi) or v != v:
            rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"{name} must be in {rng}, got {text}")
        return v
    return parse


def _int_at_least(name: str, lo: int, hi: int = 2**63 - 1):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be in [{lo}, {hi}], got {v}")
        return v
    return parse


def _device(text: str) -> str:
    from ._checks import check_device

    try:
        check_device("--device", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_layers(text: str) -> int | list[int]:
    """``"12"`` -> 12 (the first 12 layers); ``"0-7,10,12-13"`` -> those layer indices."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            a, b = int(lo), int(hi or lo)
            if not 0 <= a <= b < MAX_LAYERS:
                raise ValueError
            out.extend(range(a, b + 1))
    except ValueError:
        raise ValueError(f"layers must look like 12 or 0-7,10,12-13 (indices in [0, {MAX_LAYERS})), "
                         f"got {text!r}") from None
    if not out:
        raise ValueError(f"layers must look like 12 or 0-7,10,12-13, got {text!r}")
    return out


def _make_draft(spec: str | None, k: int | None, device, dtype):
    """``--draft``: ngram | layerskip:N | layerskip:LIST | PATH (a draft model); ``k`` None: the
    drafter's default (16 for prompt lookup, whose drafts are free; 4 for the others)."""
    from .loading import load
    from .speculative import DraftModel, LayerSkipDraft, NGramDraft

    if spec is None:
        return None
    if spec == "ngram":
        return NGramDraft(n=3, k=k or 16)
    if spec.startswith("layerskip:"):
        return LayerSkipDraft(parse_layers(spec.split(":", 1)[1]), k=k or 4)
    model, tok = load(spec, device=device, dtype=dtype)
    return DraftModel(model, tok, k=k or 4)


def _make_steering(args, model, tok):
    """``--steer PRESET|PATH --steer-strength S``."""
    from .steering.presets import PRESETS, preset_steering
    from .steering.vector import Steering

    if args.steer is None:
        if args.steer_strength is not None:
            raise ValueError("--steer-strength needs --steer PRESET|PATH")
        return None
    if args.steer in PRESETS:
        return preset_steering(args.steer, model, tok, args.steer_strength)
    if not Path(args.steer).is_file():
        raise FileNotFoundError(f"--steer {args.steer!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                "nor a steering vector file")
    return Steering(args.steer, 1.0 if args.steer_strength is None else args.steer_strength)


def run_steer_train(args) -> int:
    """``decodekit steer train --pairs FILE.jsonl --layers 8-16 -o vector.safetensors``."""
    import json

    from .loading import load
    from .steering.train import train_steering_vector

    try:
        lines = Path(args.pairs).read_text("utf-8").splitlines()
        pairs = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    pairs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.pairs}:{n}: not JSON ({e.msg})") from None
        model, tok = load(args.model, device=args.device)
        t0 = time.perf_counter()
        vec = train_steering_vector(model, tok, pairs, args.layers, method=args.method,
                                    token_index=args.token_index, batch_size=args.batch_size)
        vec.save(args.output)
    except (OSError, ImportError, ValueError) as e:
        print(f"decodekit steer train: error: {e}", file=sys.stderr)
        return 2
    print(f"trained {args.method} on {len(pairs)} pairs, layers {list(vec.layers)} "
          f"(hidden size {vec.hidden_size}) in {time.perf_counter() - t0:.1f} s -> {args.output}")
    return 0


def _guided(args) -> GuidedDecodingParams | None:
    """``--json-schema FILE`` / ``--regex RE`` / ``--grammar FILE`` / ``--choice a,b`` (at most one)."""
    given = [f for f in ("json_schema", "regex", "grammar", "choice") if getattr(args, f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"at most one of --json-schema, --regex, --grammar, --choice; got {len(given)}")
    if args.json_schema is not None:
        return GuidedDecodingParams(json=Path(args.json_schema).read_text())
    if args.grammar is not None:
        return GuidedDecodingParams(grammar=Path(args.grammar).read_text())
    if args.regex is not None:
        return GuidedDecodingParams(regex=args.regex)
    return GuidedDecodingParams(choice=[c for c in args.choice.split(",") if c])


def _lora_rank(path: str) -> int:
    """The rank tables an adapter folder needs (its config's ``r`` and ``rank_pattern``; at
    least 64). ``ValueError`` naming ``--lora`` when the folder is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--lora {path}: no such adapter folder")
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        ranks = [int(cfg.get("r") or 0), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    except (OSError, ValueError, TypeError, AttributeError):
        return 64  # loading says what is wrong with it
    return max(64, *ranks)


def run_generate(args) -> int:
    """``decodekit generate``; with ``--tp`` every rank of the torchrun job runs it, rank 0 prints."""
    if not args.tp:
        return _generate(args)
    import contextlib

    import torch.distributed as dist

    from .engine.parallel import init_distributed, is_leader

    init_distributed()
    try:
        if is_leader():
            return _generate(args)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return _generate(args)
    finally:
        dist.destroy_process_group()


def _generate(args) -> int:
    from .engine.generator import TokenGenerator
    from .engine.scheduler import continuous_batching
    from .loading import load

    try:
        params = SamplingParams(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            max_new_tokens=args.max_new_tokens, seed=args.seed, guided_decoding=_guided(args),
            truncate_prompt_tokens=args.truncate_prompt_tokens,
        )
        lora = {} if args.lora is None else {"max_loras": 1, "max_lora_rank": _lora_rank(args.lora)}
    except (OSError, ValueError) as e:
        print(f"decodekit generate: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        tp_plan = "auto" if args.tp else None
        model, tok = load(args.model, device=args.device, dtype=args.dtype, tp_plan=tp_plan)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"decodekit generate: error: {e}", file=sys.stderr)
        return 2
    max_seq_len = min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 4096)
    try:
        draft = _make_draft(args.draft, args.num_speculative_tokens, args.device, args.dtype)
        gen = TokenGenerator(model, tok, max_batch_size=1, max_seq_len=max_seq_len, draft=draft, **lora)
        if args.lora is not None:
            res = gen.load_lora(args.lora, args.lora)
            if not res.ok:
                raise ValueError(f"--lora {args.lora}: {res.status.name}: {res.message}")
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"decodekit generate: error: {e}", file=sys.stderr)
        return 2
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    try:
        steering = _make_steering(args, model, tok)
        ctx = gen.new_context(prompt, params, steering=steering, lora=args.lora)
    except (FileNotFoundError, ValueError) as e:
        print(f"decodekit generate: error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = None
    for res in continuous_batching(gen, [ctx]):
        if first is None:
            first = time.perf_counter() - t1
        if res[ctx.request_id].text and not args.no_stream:
            print(res[ctx.request_id].text, end="", flush=True)
    dt = time.perf_counter() - t1
    if args.no_stream:
        print(ctx.text, end="")
    n = len(ctx.generated_token_ids)
    spec = ""
    if draft is not None:
        st = ctx.spec_stats
        spec = (f"; draft {args.draft} k={draft.k}: acceptance {st.acceptance_rate:.2f}, "
                f"mean accepted length {st.mean_accepted_length:.2f}")
    print(f"\n[{n} tokens in {dt:.2f} s, {n / dt if dt > 0 else 0.0:.1f} tokens/s; "
          f"first token {1e3 * (first or 0):.0f} ms; prompt {len(ctx.prompt_token_ids)} tokens; "
          f"load {load_s:.1f} s; finish={ctx.finish_reason}{spec}]")
    return 0


def run_serve(args) -> int:
    """``decodekit serve``: the OpenAI-compatible server (:mod:`decodekit.serving`)."""
    try:
        from .serving import Server  # noqa: F401 (the serve extra is installed)
    except ImportError as e:
        raise ImportError(f"{e}; decodekit serve needs the serve extra: "
                          "pip install 'decodekit[serve]'") from None
    from .loading import DEFAULT_MODEL

    name = args.served_model_name or (args.model if args.model else DEFAULT_MODEL)
    api_key = args.api_key or os.environ.get("DECODEKIT_API_KEY")
    if args.ray:
        return _serve_replicas(args, name, api_key)
    if not args.tp:
        return _serve(args, name, api_key)
    import torch.distributed as dist

    from .engine.parallel import init_distributed

    init_distributed()
    try:
        return _serve(args, name, api_key)
    finally:  # (a rank that exits with the group's threads alive can abort at exit)
        dist.destroy_process_group()


def _serve(args, name: str, api_key: str | None) -> int:
    """One process's server (with ``--tp``: rank 0 serves, the other ranks follow it)."""
    from .serving import Server

    llm = serve_llm(args)
    if args.tp and _follow(llm, args):
        return 0
    server = Server(llm, host=args.host, port=args.port, model_name=name, num_steps=args.num_steps,
                    max_waiting=args.max_waiting, api_key=api_key, shutdown_timeout=args.shutdown_timeout,
                    steering_dir=args.steering_dir, log_level=args.log_level, tensor_parallel=args.tp)
    print(f"decodekit serve: {name} on {server.url} (max_batch_size={args.max_batch_size}, "
          f"max_seq_len={llm.generator.max_seq_len}, num_steps={args.num_steps}, pid={os.getpid()})",
          flush=True)
    server.run()
    print("decodekit serve: shut down", flush=True)
    return 0


def serve_llm(args):
    """The ``LLM`` that ``decodekit serve``'s options describe (model, draft, adapters); each
    Ray replica calls it too."""
    from .llm import LLM
    from .loading import load

    loras = dict(_name_path(spec) for spec in args.lora)
    model, tok = load(args.model, device=args.device, dtype=args.dtype, tp_plan="auto" if args.tp else None)
    positions = getattr(model.config, "max_position_embeddings", 2048) or 2048
    max_seq_len = args.max_seq_len or min(positions, 4096)
    draft = _make_draft(args.draft, args.num_speculative_tokens, args.device, args.dtype)
    rank = max([64, *(_lora_rank(p) for p in loras.values())])
    llm = LLM(model=model, tokenizer=tok, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len,
              draft=draft, max_loras=max(args.max_loras, len(loras)), max_lora_rank=rank)
    for name, path in loras.items():
        res = llm.generator.load_lora(name, path)
        if not res.ok:
            raise ValueError(f"--lora {name}={path}: {res.status.name}: {res.message}")
    return llm


def _serve_replicas(args, name: str, api_key: str | None) -> int:
    """``decodekit serve --ray --replicas N``: N servers under Ray Serve
    (:mod:`decodekit.serving.replicas`)."""
    import functools

    from .serving import replicas

    if args.tp:
        raise ValueError("--ray and --tp do not combine yet: run one or the other")
    app = replicas.deployment(functools.partial(serve_llm, args), replicas=args.replicas,
                              num_cpus=args.ray_num_cpus, model_name=name, num_steps=args.num_steps,
                              max_waiting=args.max_waiting, api_key=api_key, steering_dir=args.steering_dir,
                              shutdown_timeout=args.shutdown_timeout)

    def ready(url: str) -> None:
        print(f"decodekit serve: {name} on {url} ({args.replicas} Ray Serve replicas, max_batch_size="
              f"{args.max_batch_size} each, num_steps={args.num_steps}, pid={os.getpid()})", flush=True)
    replicas.run(app, host=args.host, port=args.port, address=args.ray_address, ready=ready)
    print("decodekit serve: shut down", flush=True)
    return 0


def _follow(llm, args) -> bool:
    """On a tensor-parallel rank other than 0: run the engine as rank 0 says, until it stops
    (True); on rank 0, False. SIGTERM is left to rank 0, which stops everyone."""
    import signal

    from .engine.parallel import is_leader
    from .serving import EngineLoop

    if is_leader():
        return False
    signal.signal(signal.SIGTERM, lambda *_: None)
    EngineLoop(llm, num_steps=args.num_steps, max_waiting=args.max_waiting, tensor_parallel=True).follow()
    return True


def _name_path(spec: str) -> tuple[str, str]:
    """``--lora NAME=PATH`` (or PATH, named by itself)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else (spec, spec)


def _serve_parser(sub) -> None:
    """``decodekit serve``'s options."""
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (default: embedded SmolLM2)")
    sv.add_argument("model", nargs="?", default=None, help="local model folder or .gguf file")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=_int_at_least("--port", 0, 65535), default=8000)
    sv.add_argument("--served-model-name", default=None, help="the name clients pass as model")
    sv.add_argument("--max-batch-size", type=_int_at_least("--max-batch-size", 1, 4096), default=16)
    sv.add_argument("--max-seq-len", type=_int_at_least("--max-seq-len", 2, 1 << 20), default=None)
    sv.add_argument("--max-waiting", type=_int_at_least("--max-waiting", 1, 1 << 20), default=256,
                    help="requests allowed to wait for a slot; more get HTTP 429")
    sv.add_argument("--num-steps", type=_int_at_least("--num-steps", 1, 1024), default=1,
                    help="decode steps per engine call (streaming granularity)")
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/ "
                    "(default: $DECODEKIT_API_KEY)")
    sv.add_argument("--draft", default=None, metavar="ngram|layerskip:N|PATH", help="speculative decoding")
    sv.add_argument("--num-speculative-tokens", type=_int_at_least("--num-speculative-tokens", 1))
    sv.add_argument("--max-loras", type=_int_at_least("--max-loras", 0, 1024), default=0)
    sv.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                    help="load a LoRA adapter at start (repeatable); requests pick it with lora: NAME")
    sv.add_argument("--tp", action="store_true", help="tensor parallelism with transformers' TP plan, "
                    "one rank per process: torchrun --nproc_per_node N -m decodekit serve --tp")
    sv.add_argument("--ray", action="store_true", help="serve --replicas copies under Ray Serve "
                    "(pip install 'decodekit[ray]'); a local Ray head unless --ray-address")
    sv.add_argument("--replicas", type=_int_at_least("--replicas", 1, 1024), default=2,
                    help="with --ray: number of server replicas (one engine loop and model each)")
    sv.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="with --ray: an existing Ray cluster (e.g. ray://head:10001 or auto)")
    sv.add_argument("--ray-num-cpus", type=_unit("--ray-num-cpus", 0.01, 1024.0), default=1.0,
                    help="with --ray: CPUs reserved per replica (also its torch threads)")
    sv.add_argument("--steering-dir", default=None, metavar="DIR",
                    help="requests may steer with vector files in DIR (steering.vector: a file name)")
    sv.add_argument("--shutdown-timeout", type=_unit("--shutdown-timeout", 0.0, 3600.0), default=30.0,
                    help="seconds running requests get to finish after SIGTERM")
    sv.add_argument("--log-level", default="warning",
                    choices=["critical", "error", "warning", "info", "debug"])
    sv.add_argument("--device", type=_device, default=None)
    sv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decodekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream text from a model (default: embedded SmolLM2)")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help="local model folder or .gguf file")
    g.add_argument("--max-new-tokens", type=_int_at_least("--max-new-tokens", 1), default=128)
    g.add_argument("--temperature", type=_unit("--temperature", 0.0, 100.0), default=0.7)
    g.add_argument("--top-k", type=_int_at_least("--top-k", -1), default=0)
    g.add_argument("--top-p", type=_unit("--top-p", 0.0, 1.0, lo_open=True), default=0.9)
    g.add_argument("--min-p", type=_unit("--min-p", 0.0, 1.0), default=0.0)
    g.add_argument("--seed", type=_int_at_least("--seed", 0), default=None, help="in [0, 2**63 - 1]")
    g.add_argument("--truncate-prompt-tokens", type=_int_at_least("--truncate-prompt-tokens", -1),
                   default=None, metavar="K", help="keep the last K prompt tokens (-1: as many as fit)")
    g.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end")
    g.add_argument("--draft", default=None, metavar="ngram|layerskip:N|PATH",
                   help="speculative decoding: prompt lookup (ngram), the model through its first N "
                        "layers or a layer list like 0-7,12 (layerskip:...), or a draft model folder "
                        "or .gguf file with the same vocabulary (PATH)")
    g.add_argument("--num-speculative-tokens", type=_int_at_least("--num-speculative-tokens", 1),
                   help="longest draft (default 16 for ngram, 4 for the others)")
    g.add_argument("--steer", default=None, metavar="PRESET|PATH",
                   help="steer with a preset (brevity, positive, formal) or a vector file "
                        "(.safetensors, or a .gguf control vector)")
    g.add_argument("--steer-strength", type=_unit("--steer-strength", -1e3, 1e3), default=None,
                   help="steering strength (default: the preset's, else 1.0)")
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="output: JSON valid for this schema")
    g.add_argument("--regex", default=None, metavar="RE", help="output: matches this regular expression")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="output: in this EBNF/GBNF or Lark grammar")
    g.add_argument("--choice", default=None, metavar="A,B,...", help="output: one of these strings")
    g.add_argument("--lora", default=None, metavar="PATH", help="a LoRA adapter folder (peft format)")
    g.add_argument("--tp", action="store_true", help="tensor parallelism with transformers' TP plan, one "
                   "rank per process: torchrun --nproc_per_node N -m decodekit generate ... --tp")
    g.add_argument("--device", type=_device, default=None)
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    _serve_parser(sub)
    st = sub.add_parser("steer", help="steering vectors")
    st_sub = st.add_subparsers(dest="steer_command", required=True)
    tr = st_sub.add_parser("train", help="train a steering vector from contrastive pairs")
    tr.add_argument("--pairs", required=True, help='JSON Lines of {"positive": ..., "negative": ...}')
    tr.add_argument("--layers", required=True, help="decoder layers, e.g. 8-16")
    tr.add_argument("-o", "--output", required=True, help="output .safetensors (or .gguf) file")
    tr.add_argument("--method", choices=["mean_diff", "pca"], default="mean_diff")
    tr.add_argument("--model", default=None, help="local model folder or .gguf file")
    tr.add_argument("--token-index", type=int, default=-1)
    tr.add_argument("--batch-size", type=_int_at_least("--batch-size", 1, 4096), default=16)
    tr.add_argument("--device", type=_device, default=None)
    demo = sub.add_parser("demo", help="batched sampler demo with an exactness check")
    demo.add_argument("--vocab-size", type=_int_at_least("--vocab-size", 100, 1 << 20), default=32000)
    demo.add_argument("--steps", type=_int_at_least("--steps", 1, 10_000), default=8)
    demo.add_argument("--draws", type=_int_at_least("--draws", 100, 10_000_000), default=20000)
    demo.add_argument("--device", type=_device, default=None)
    demo.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = "steer train" if args.command == "steer" else args.command
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "steer":
            return run_steer_train(args)
        if args.command == "serve":
            return run_serve(args)
        if args.backend == "triton" and not torch.cuda.is_available() and args.device != "cpu":
            raise ValueError("--backend triton needs a CUDA GPU (or --device cpu with TRITON_INTERPRET=1)")
        return run_demo(args.vocab_size, args.steps, args.draws, args.device, args.backend)
    except KeyboardInterrupt:
        print(f"decodekit {command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, MemoryError) as e:
        # every failure is one line, never a traceback (DECODEKIT_TRACEBACK=1 shows it)
        if os.environ.get("DECODEKIT_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"decodekit {command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
