"""Serving benchmark: decodekit's OpenAI-compatible server (``decodekit.serving.Server``, in this
process) under ``c`` concurrent streaming clients (threads, one ``openai`` client each, closed loop;
TTFT = first text chunk - send, ITL = gaps between text chunks) against ``LLM.generate`` offline on
the same requests in waves of ``c``: seeded, exactly ``max_tokens`` each (``ignore_eos``), so both
do the same work and must give the same texts; each side on a fresh, warmed-up ``LLM`` of the same
settings. ``--hf-serve``: the same clients against ``transformers serve``. Method: bench/README.md.

Usage: ``python -m bench.serve [--requests R] [--concurrency 1,8,32] [--hf-serve cb|plain|off]``
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import _harness as H
from ._models import Workload, chat_prompts, load_workload

SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def make_requests(wl: Workload, n: int, seed: int = 0) -> tuple[list[Any], list[int]]:
    """``n`` prompts of mixed length (1 to 8 chat prompts joined, seeded): chat messages for a model
    with a chat template, token ids otherwise; and their lengths in tokens."""
    rng = random.Random(seed)
    texts = [" ".join(rng.sample(chat_prompts(), rng.choice((1, 1, 2, 4, 8)))) for _ in range(n)]
    lengths = [len(wl.encode(t)) for t in texts]
    if getattr(wl.tokenizer, "chat_template", None):
        return [[{"role": "user", "content": t}] for t in texts], lengths
    return wl.encode_all(texts), lengths


def client(api: Any, model: str, todo: Any, out: dict, cpu: list, errors: list, kw: dict[str, Any]) -> None:
    """Send requests from ``todo`` (an iterator the clients share) one after another, streaming;
    stamp every chunk with text."""
    t_cpu = time.thread_time()
    try:
        for i, (prompt, extra) in todo:
            chat = isinstance(prompt[0], dict)
            call = api.chat.completions.create if chat else api.completions.create
            t0 = time.perf_counter()
            stream = call(model=model, stream=True, stream_options={"include_usage": True}, **kw, **extra,
                          **({"messages": prompt} if chat else {"prompt": prompt}))
            stamps, pieces, tokens = [], [], None
            for chunk in stream:
                now = time.perf_counter()
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
                piece = chunk.choices and (chunk.choices[0].delta.content if chat else chunk.choices[0].text)
                if piece:
                    stamps.append(now)
                    pieces.append(piece)
            out[i] = {"t0": t0, "stamps": stamps, "text": "".join(pieces), "tokens": tokens or len(stamps)}
    except Exception as exc:  # noqa: BLE001 - raised again by run_clients
        errors.append(f"{type(exc).__name__}: {exc}"[:300])
    cpu.append(time.thread_time() - t_cpu)


def run_clients(url: str, model: str, reqs: Sequence[tuple[Any, dict]], c: int, kw: dict[str, Any]
                ) -> dict[str, Any]:
    """``c`` client threads over ``reqs`` (prompt, its own fields): wall time and figures."""
    import openai

    pct = lambda xs: [float(v) for v in np.percentile(np.asarray(xs) * 1e3, [50, 90, 99])] if xs else []
    todo, out, cpu, errors = iter(enumerate(reqs)), {}, [], []  # next() on it is atomic (GIL)
    apis = [openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=3600) for _ in range(c)]
    threads = [threading.Thread(target=client, args=(a, model, todo, out, cpu, errors, kw)) for a in apis]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors or len(out) != len(reqs):
        raise RuntimeError(errors[0] if errors else f"{len(reqs) - len(out)} requests got no answer")
    res = [out[i] for i in range(len(reqs))]
    tokens = sum(r["tokens"] for r in res)
    return {"wall_s": wall, "req_s": len(res) / wall, "tok_s": tokens / wall, "tokens": tokens,
            "ttft_ms": pct([r["stamps"][0] - r["t0"] for r in res]),
            "itl_ms": pct([b - a for r in res for a, b in zip(r["stamps"], r["stamps"][1:], strict=False)]),
            "chunks": sum(len(r["stamps"]) for r in res), "client_cpu_s": sum(cpu),
            "token_counts": sorted({r["tokens"] for r in res}), "texts": [r["text"] for r in res]}


def point(wl: Workload, prompts: list[Any], n: int, c: int, batch: int, seq: int, flip: bool
          ) -> dict[str, Any]:
    """The server and offline (waves of ``c``) on the requests, each on a fresh warmed-up LLM."""
    from decodekit import LLM, SamplingParams
    from decodekit.serving import Server

    params = [SamplingParams(**SAMPLING, seed=1000 + i, max_new_tokens=n, ignore_eos=True)
              for i in range(len(prompts))]
    reqs = [(q, {"seed": 1000 + i, "extra_body": {"ignore_eos": True}}) for i, q in enumerate(prompts)]
    kw, res = {"max_tokens": n, **SAMPLING}, {}
    warm = [{"role": "user", "content": "Hello."}] if isinstance(prompts[0][0], dict) else prompts[0][:4]
    for side in (["offline", "server"] if flip else ["server", "offline"]):
        llm = LLM(model=wl.model, tokenizer=wl.tokenizer, max_batch_size=batch, max_seq_len=seq)
        llm.generate([warm], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm-up
        if side == "server":
            with Server(llm, port=0, model_name="bench") as srv:
                run_clients(srv.url, "bench", [(warm, {})], 1, {**kw, "max_tokens": 4})  # warm-up
                res[side] = run_clients(srv.url, "bench", reqs, c, kw)
            continue
        wall, outs = H.timed_call(lambda llm=llm: [o for j in range(0, len(prompts), c)
                                                   for o in llm.generate(prompts[j:j + c], params[j:j + c])],
                                  wl.model.device)
        tokens, texts = sum(len(o.token_ids) for o in outs), [o.text for o in outs]
        res[side] = {"wall_s": wall, "tok_s": tokens / wall, "tokens": tokens, "texts": texts}
    same = [a == b for a, b in zip(res["server"].pop("texts"), res["offline"]["texts"], strict=True)]
    off = res["offline"]
    print(f"c={c}: server {res['server']['tok_s']:.1f} tok/s, offline {off['tok_s']:.1f} tok/s, "
          f"identical {sum(same)}/{len(same)}", flush=True)
    return {"side": "decodekit server", "status": "ok", "concurrency": c, **res["server"],
            "offline_tok_s": off["tok_s"], "offline_wall_s": off["wall_s"], "offline_tokens": off["tokens"],
            "server_over_offline": res["server"]["tok_s"] / off["tok_s"], "identical": sum(same) / len(same)}


def hf_serve(wl: Workload, prompts: list[Any], n: int, conc: list[int], mode: str) -> list[dict[str, Any]]:
    """The clients against ``transformers serve`` (``--continuous-batching`` in mode cb) on the model
    saved through a fresh copy (the embedded one comes from GGUF: no ``save_pretrained``); exactly
    ``n`` tokens by a ``generation_config`` extra (it refuses ``ignore_eos``). A row per concurrency
    or one with the error."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "log", "w+") as log:
        model = AutoModelForCausalLM.from_config(wl.model.config, dtype=next(wl.model.parameters()).dtype)
        model.load_state_dict(wl.model.state_dict())
        model.save_pretrained(tmp)
        wl.tokenizer.save_pretrained(tmp)
        with socket.socket() as s:  # a free port
            s.bind(("127.0.0.1", 0))
            port, rows, side = s.getsockname()[1], [], f"transformers serve ({mode})"
        url = f"http://127.0.0.1:{port}"
        cmd = [str(Path(sys.executable).with_name("transformers")), "serve", tmp, "--host", "127.0.0.1",
               "--port", str(port), "--device", model.device.type, "--dtype", str(model.dtype)[6:],
               *(["--continuous-batching"] * (mode == "cb"))]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        tail = " | ".join(log.read().strip().splitlines()[-3:])
                        raise RuntimeError(f"did not start (exit {proc.poll()}): {tail}") from None
                    time.sleep(1)
            g = json.dumps(dict(do_sample=True, top_k=0, min_new_tokens=n, max_new_tokens=n, **SAMPLING,
                                eos_token_id=wl.model.generation_config.eos_token_id, pad_token_id=wl.pad_id))
            reqs = [(q, {"seed": 1000 + i, "extra_body": {"generation_config": g}})
                    for i, q in enumerate(prompts)]
            kw = {"max_tokens": n, **SAMPLING}
            run_clients(url, tmp, reqs[-1:], 1, kw)  # warm-up
            for c in conc:
                r = run_clients(url, tmp, reqs, c, kw)
                r.pop("texts")
                rows.append({"side": side, "status": "ok", "concurrency": c, **r})
                print(f"transformers serve c={c}: {r['tok_s']:.1f} tok/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - its failure is a result
            rows.append({"side": side, "status": H.short_error(exc), "concurrency": None})
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.serve", __doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="requests per point (64; 4 with --smoke)")
    p.add_argument("--concurrency", help="comma-separated client counts (1,8,32; 1,2 with --smoke)")
    p.add_argument("--hf-serve", choices=("cb", "plain", "off"),
                   help="transformers serve with / without --continuous-batching, or none (cb; smoke: off)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    conc = [int(c) for c in (args.concurrency or ("1,2" if args.smoke else "1,8,32")).split(",")]
    n_req, hf = args.requests or (4 if args.smoke else 64), args.hf_serve or ("off" if args.smoke else "cb")
    n = H.check_tokens(args.max_new_tokens or (8 if args.smoke else 32))
    wl = load_workload("random:tiny" if args.smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    prompts, lengths = make_requests(wl, n_req)
    batch, seq = max(conc), H.max_seq([[0] * max(lengths)], n) + 64
    dk = [point(wl, prompts, n, c, batch, seq, k % 2 == 1) for k, c in enumerate(conc)]
    hf_rows = hf_serve(wl, prompts, n, conc, hf) if hf != "off" else []
    identical = sum(r["identical"] for r in dk) / len(dk)
    lens = f"{min(lengths)} to {max(lengths)} tokens (median {int(np.median(lengths))})"
    meta = H.metadata(dev, "client-side time.perf_counter: wall time of all requests per concurrency; TTFT, "
                      "ITL per streamed text chunk", model=f"{wl.description}, {wl.dtype_name}",
                      requests=n_req, max_tokens=n, concurrency=conc, max_batch_size=batch, max_seq_len=seq,
                      prompts=lens, identical=identical, smoke=args.smoke)
    lat = ["TTFT ms p50 / p90 / p99", "ITL ms p50 / p90 / p99"]
    fmt = lambda p: " / ".join(f"{v:,.0f}" for v in p)
    body = [f"- {n_req} requests, prompts of {lens}, exactly {n} output tokens each (ignore_eos), "
            f"temperature 0.8, top-p 0.95, seed 1000 + i; a fresh `LLM(max_batch_size={batch}, "
            f"max_seq_len={seq})` per side, warmed up",
            "- clients: threads of the benchmark's process (one `openai` client each, streaming); offline: "
            "`LLM.generate` on the same requests in waves of `c`; **server / offline** = server tok/s / "
            "offline tok/s = offline wall / server wall (1.00x: no overhead)",
            f"- server texts identical to offline (same seeds): {identical:.0%} of requests", "",
            H.table(["clients", "req/s", "out tok/s", *lat, "offline tok/s", "server / offline",
                     "client CPU s"],
                    [[r["concurrency"], H.f(r["req_s"], "{:.2f}"), H.f(r["tok_s"]), fmt(r["ttft_ms"]),
                      fmt(r["itl_ms"]), H.f(r["offline_tok_s"]), H.ratio(r["server_over_offline"]),
                      H.f(r["client_cpu_s"], "{:.2f}")] for r in dk])]
    if hf_rows:
        ok = {r["concurrency"]: r for r in hf_rows if r["status"] == "ok"}
        pairs = [(d, ok[d["concurrency"]]) for d in dk if d["concurrency"] in ok]
        body += ["", f"`transformers serve` ({hf}; `generation_config` extra: min_new_tokens = "
                 f"max_new_tokens = {n}, the same sampling; its seeds are global, texts not compared):", ""]
        body += [H.table(["clients", "req/s", "out tok/s", *lat, "decodekit server / HF"], [
            [h["concurrency"], H.f(h["req_s"], "{:.2f}"), H.f(h["tok_s"]), fmt(h["ttft_ms"]),
             fmt(h["itl_ms"]), H.ratio(d["tok_s"] / h["tok_s"])] for d, h in pairs])] if pairs else []
        body += [f"- {r['side']}: {r['status']}" for r in hf_rows if r["status"] != "ok"]
    H.report("serve", "Serving benchmark", args, meta, dk + hf_rows, body)
    return 0 if identical == 1.0 and all(r["tok_s"] > 0 for r in dk) else 1


if __name__ == "__main__":
    sys.exit(main())
