"""The server under load, at shutdown and on the embedded model.

- 32 concurrent clients send 400 requests of mixed lengths (plain, streamed, cancelled
  mid-stream, bad parameters, chat): every valid one gets its complete offline result, every
  bad one a 400, cancelled ones free their slots, nothing is lost or duplicated, memory
  comes back, and ``/metrics`` counts what the clients saw.
- ``decodekit serve`` as a process: SIGTERM during load lets running requests finish, then
  the process exits 0.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from _serving import chat_tokenizer, metric, start_server, tiny_llm

from decodekit import SamplingParams
from decodekit.serving import Server

pytestmark = pytest.mark.usefixtures("one_thread")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _idle_metrics(url: str, timeout: float = 30.0) -> str:
    """``/metrics`` once nothing runs or waits and no slot is held (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", timeout=10).text
        if all(metric(text, m) == 0 for m in ("decodekit_requests_running", "decodekit_requests_waiting",
                                               "decodekit_kv_cache_usage")):
            return text
        if time.monotonic() > deadline:
            raise AssertionError("the server did not become idle:\n" + text)
        time.sleep(0.05)


def _workload(n: int, seed: int) -> list[dict]:
    """Mixed requests: kind, body, and (for valid ones) the offline SamplingParams."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.choices(["plain", "stream", "cancel", "bad", "chat"], [4, 3, 1, 1, 1])[0]
        words = " ".join(f"w{rng.randrange(3, 300)}" for _ in range(rng.randrange(1, 40)))
        max_tokens = rng.randrange(1, 24)
        body = {"model": "tiny", "prompt": words, "max_tokens": max_tokens, "seed": i,
                "temperature": rng.choice([0.0, 0.7, 1.0]), "top_p": rng.choice([1.0, 0.9])}
        if kind == "cancel":  # long enough that the client leaves well before it could end
            body.update(max_tokens=340, ignore_eos=True, stream=True)
        elif kind == "stream":
            body["stream"] = True
        elif kind == "bad":
            field = rng.choice(["temperature", "top_p", "n", "max_tokens"])
            body[field] = rng.choice([-5, -0.5, "x"] if field == "temperature" else [-5, 0, 10**9, "x"])
        elif kind == "chat":
            body = {k: v for k, v in body.items() if k != "prompt"}
            body["messages"] = [{"role": "user", "content": words}]
        out.append({"id": i, "kind": kind, "body": body})
    return out


def _expected(llm, work: list[dict]) -> None:
    """Each valid request's offline text (the same settings through ``LLM.generate``)."""
    items = [w for w in work if w["kind"] in ("plain", "stream", "chat")]
    prompts, params = [], []
    for w in items:
        b = w["body"]
        prompts.append(b["messages"] if w["kind"] == "chat" else b["prompt"])
        params.append(SamplingParams(max_new_tokens=b["max_tokens"], seed=b["seed"],
                                     temperature=b["temperature"], top_p=b["top_p"]))
    for w, out in zip(items, llm.generate(prompts, params), strict=True):
        w["want"], w["want_tokens"] = out.text, out.token_ids


def _send(url: str, w: dict) -> dict:
    """One client request; returns what the client saw."""
    kind, body = w["kind"], w["body"]
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    if kind in ("stream", "cancel"):
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            text, done = "", False
            for line in r.iter_lines():
                if kind == "cancel":
                    return {"status": r.status_code, "cancelled": True}
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    text += "".join(c["text"] for c in chunk["choices"])
            return {"status": r.status_code, "text": text, "done": done}
    r = httpx.post(url + path, json=body, timeout=120)
    if r.status_code != 200:
        return {"status": r.status_code, "error": r.json()["error"]}
    choice = r.json()["choices"][0]
    return {"status": 200, "text": choice["message"]["content"] if kind == "chat" else choice["text"],
            "done": True, "usage": r.json()["usage"]}


def test_32_clients_400_requests(tmp_path):
    from _models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    chat_tokenizer().save_pretrained(tmp_path)
    oracle = tiny_llm(max_batch_size=16)
    work = _workload(400, seed=0)
    _expected(oracle, work)
    proc, url = _start_cli(tmp_path, "--max-batch-size", "16", "--num-steps", "2", "--max-seq-len", "400")
    try:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda w: _send(url, w), _workload(100, seed=1)))  # warm-up: pools reach their size
            before_metrics = _idle_metrics(url)
            rss0 = _rss_mb(proc.pid)
            seen = list(pool.map(lambda w: _send(url, w), work))
        after_metrics = _idle_metrics(url)
        rss1 = _rss_mb(proc.pid)
    finally:
        proc.kill()
    assert len(seen) == len(work)
    counts = {k: 0 for k in ("plain", "stream", "cancel", "bad", "chat")}
    for w, s in zip(work, seen, strict=True):
        counts[w["kind"]] += 1
        if w["kind"] == "bad":
            assert s["status"] == 400, (w, s)
            param, message = s["error"]["param"], s["error"]["message"]
            assert param in ("temperature", "top_p", "n", "max_tokens") or (
                param == "prompt" and "max_tokens 1000000000" in message), s
        elif w["kind"] == "cancel":
            assert s["status"] == 200
        else:
            assert s["status"] == 200 and s["done"], (w, s)
            assert s["text"] == w["want"], (w, s)
    assert min(counts.values()) >= 20, counts
    assert abs(rss1 - rss0) < 8, f"the server's RSS moved by {rss1 - rss0:.1f} MB over the run"

    def delta(name: str, labels: str = "") -> float:
        return metric(after_metrics, name, labels) - metric(before_metrics, name, labels)
    finished = sum(delta("decodekit_requests_total", f'finish_reason="{r}"') for r in ("stop", "length"))
    cancelled = delta("decodekit_request_cancellations_total")
    # Every request ended exactly once. A client that leaves after its first chunk is a
    # cancellation unless the server finished the request before it saw the client go (a
    # scheduling race the client cannot observe; it once happened under CI's load with 120
    # tokens): most of them must still be cancellations.
    assert finished + cancelled == counts["plain"] + counts["stream"] + counts["chat"] + counts["cancel"]
    assert finished >= counts["plain"] + counts["stream"] + counts["chat"]
    assert cancelled >= 0.9 * counts["cancel"], (cancelled, counts["cancel"])
    assert delta("decodekit_request_rejections_total", 'reason="invalid"') == counts["bad"]
    assert delta("decodekit_request_failures_total") == 0
    assert delta("decodekit_time_to_first_token_seconds_count") == finished + cancelled
    seen_tokens = sum(len(w["want_tokens"]) for w in work if "want_tokens" in w)
    assert delta("decodekit_generation_tokens_total") >= seen_tokens


def _start_cli(model_dir: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """``decodekit serve`` on the saved tiny model, on a free port."""
    return start_server([sys.executable, "-m", "decodekit", "serve", str(model_dir), "--port", "0",
                         "--served-model-name", "tiny", *extra])


def test_cli_serve_sigterm_finishes_running_requests_and_exits_0(tmp_path):
    from _models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    chat_tokenizer().save_pretrained(tmp_path)
    proc, url = _start_cli(tmp_path, "--max-batch-size", "4", "--shutdown-timeout", "60")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        # (an unseeded sampled request could draw EOS within 3 tokens: EOS is ignored here)
        assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                              max_tokens=3, extra_body={"ignore_eos": True}
                                              ).choices[0].finish_reason == "length"
        results: list = []

        def run(i: int) -> None:
            chunks = list(client.completions.create(model="tiny", prompt=f"w{i + 5}", max_tokens=40, seed=i,
                                                    extra_body={"ignore_eos": True}, stream=True,
                                                    stream_options={"include_usage": True}))
            reasons = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
            results.append((chunks[-1].usage.completion_tokens, reasons))
        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # they are running (4 slots) or waiting
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert proc.wait(90) == 0
        proc.reader.join(10)
        out = "".join(proc.lines)
        assert "shut down" in out
        assert results == [(40, ["length"])] * 6
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_embedded_model_chat_equals_llm_generate():
    from decodekit import LLM

    llm = LLM(max_batch_size=2, max_seq_len=256)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = llm.generate([messages], SamplingParams(max_new_tokens=12, temperature=0))[0]
    with Server(llm, port=0, model_name="smol") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        got = client.chat.completions.create(model="smol", messages=messages, max_tokens=12, temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smol", messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
        schema = {"type": "object", "required": ["city", "population"],
                  "properties": {"city": {"type": "string"}, "population": {"type": "integer"}}}
        guided = client.chat.completions.create(
            model="smol", messages=messages, max_tokens=60, seed=1,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    assert got.choices[0].message.content == want.text == streamed
    assert "Paris" in want.text
    jsonschema.validate(json.loads(guided.choices[0].message.content), schema)
    assert guided.choices[0].finish_reason == "stop"
