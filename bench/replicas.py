"""Replicas benchmark: ``decodekit serve --ray --replicas R`` (Ray Serve, one model and engine
loop per replica, ``--ray-num-cpus 1`` each) at R = 1 and 2, against one plain ``decodekit
serve`` process on all the cores, on the same requests from ``c`` streaming clients. On a
2-core CPU this is a sanity check (do both replicas take load, what does Ray's proxy cost),
not a scaling claim. Method: bench/README.md.

Usage: ``python -m bench.replicas [--requests R] [--concurrency C]``
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _harness as H
from ._models import Workload, load_workload
from .serve import SAMPLING, make_requests, run_clients

REPO = Path(__file__).resolve().parents[1]


def _save(wl: Workload, folder: str) -> None:
    """The workload's model as a folder every replica loads (a fresh copy: a GGUF-loaded model
    has no ``save_pretrained``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(wl.model.config, dtype=next(wl.model.parameters()).dtype)
    model.load_state_dict(wl.model.state_dict())
    model.generation_config = wl.model.generation_config
    model.save_pretrained(folder)
    wl.tokenizer.save_pretrained(folder)


def _serve(folder: str, extra: list[str], threads: int) -> tuple[subprocess.Popen, str, list[str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "decodekit", "serve", folder, "--port", str(port),
                             "--served-model-name", "bench", *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = [m.group(1) for m in (re.search(r"on (http://\S+) ", x) for x in list(lines)) if m]
        if found:
            return proc, found[0], lines
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start: " + " | ".join(lines[-5:]))


def point(folder: str, name: str, extra: list[str], threads: int, reqs: list[tuple[Any, dict]], c: int,
          kw: dict[str, Any]) -> dict[str, Any]:
    """One server configuration under ``c`` clients (after a warm-up of ``c`` requests)."""
    proc, url, lines = _serve(folder, extra, threads)
    try:
        run_clients(url, "bench", reqs[:c], c, kw)  # warm-up: every replica's first steps
        r = run_clients(url, "bench", reqs, c, kw)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    texts = r.pop("texts")
    print(f"{name}: {r['req_s']:.2f} req/s, {r['tok_s']:.1f} tok/s", flush=True)
    return {"side": name, "status": "ok", "concurrency": c, "exit_code": proc.returncode, **r, "texts": texts}


def main(argv: Sequence[str] | None = None) -> int:
    p = H.parser("bench.replicas", __doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="requests per point (48; 6 with --smoke)")
    p.add_argument("--concurrency", type=int, help="concurrent streaming clients (8; 2 with --smoke)")
    args = p.parse_args(argv)
    dev = H.setup(args)
    n_req, c = args.requests or (6 if args.smoke else 48), args.concurrency or (2 if args.smoke else 8)
    n = H.check_tokens(args.max_new_tokens or (4 if args.smoke else 32))
    wl = load_workload("random:tiny" if args.smoke else (args.model or ["embedded"])[0], dev, args.dtype)
    prompts, lengths = make_requests(wl, n_req)
    reqs = [(q, {"seed": 1000 + i, "extra_body": {"ignore_eos": True}}) for i, q in enumerate(prompts)]
    kw = {"max_tokens": n, **SAMPLING}
    cores = os.cpu_count() or 1
    common = ["--max-batch-size", str(c), "--max-seq-len", str(H.max_seq([[0] * max(lengths)], n) + 64)]
    with tempfile.TemporaryDirectory() as folder:
        _save(wl, folder)
        rows = [point(folder, f"one process ({cores} threads)", common, cores, reqs, c, kw)]
        for r in (1, 2):
            ray = [*common, "--ray", "--replicas", str(r), "--ray-num-cpus", "1"]
            name = f"Ray Serve, {r} replica{'s' * (r > 1)} (1 CPU each)"
            rows.append(point(folder, name, ray, 1, reqs, c, kw))
    base = rows[0]
    same = [sum(a == b for a, b in zip(r.pop("texts"), base["texts"], strict=True)) for r in rows[1:]]
    base.pop("texts")
    for r, k in zip(rows[1:], same, strict=True):
        r["identical_to_one_process"] = k / n_req
        r["over_one_process"] = r["tok_s"] / base["tok_s"]
    meta = H.metadata(dev, "client-side time.perf_counter: wall time of all requests", requests=n_req,
                      max_tokens=n, concurrency=c, model=f"{wl.description}, {wl.dtype_name}",
                      smoke=args.smoke)
    fmt = lambda p: " / ".join(f"{v:,.0f}" for v in p)
    body = [f"- {n_req} requests (prompts of {min(lengths)} to {max(lengths)} tokens), exactly {n} output "
            f"tokens each (ignore_eos), temperature 0.8, top-p 0.95, seed 1000 + i; {c} streaming clients "
            "(threads of the benchmark's process); each server started fresh, warmed up with "
            f"{c} requests; `--max-batch-size {c}` per server / replica", "",
            H.table(["server", "req/s", "out tok/s", "TTFT ms p50 / p90 / p99", "ITL ms p50 / p90 / p99",
                     "vs one process", "texts = one process", "exit code"],
                    [[r["side"], H.f(r["req_s"], "{:.2f}"), H.f(r["tok_s"]), fmt(r["ttft_ms"]),
                      fmt(r["itl_ms"]), H.ratio(r.get("over_one_process", 1.0)),
                      f"{r.get('identical_to_one_process', 1.0):.0%}", r["exit_code"]] for r in rows])]
    H.report("replicas", "Replicas benchmark (Ray Serve)", args, meta, rows, body)
    return 0 if all(r["status"] == "ok" and r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
