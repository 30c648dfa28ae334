"""Server replicas on Ray Serve (slow: a local Ray head starts in a subprocess).

``decodekit serve MODEL --ray --replicas 2`` as the README writes it: 50 requests through the
``openai`` client (plain, streamed and chat; seeded and greedy) all equal ``LLM.generate``
offline, both replicas answered some (the ``x-decodekit-replica`` header), a bad request
is a 400 naming the field, and SIGTERM shuts Serve and Ray down with exit code 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from _serving import chat_tokenizer, start_server, tiny_llm

from decodekit import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(n: int) -> list[dict]:
    out = []
    for i in range(n):
        words = " ".join(f"w{5 + (i * 7 + j * 3) % 200}" for j in range(1 + i % 9))
        kw = {"seed": i, "temperature": 0.8, "top_p": 0.9} if i % 2 else {"temperature": 0.0}
        kind = ("plain", "stream", "chat")[i % 3]
        out.append({"kind": kind, "words": words, "max_tokens": 4 + i % 12, "kw": kw})
    return out


def _ask(client, r: dict) -> tuple[str, str]:
    """(text, replica) as the openai client sees them."""
    if r["kind"] == "chat":
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[{"role": "user", "content": r["words"]}], max_tokens=r["max_tokens"],
            **r["kw"])
        return raw.parse().choices[0].message.content, raw.headers["x-decodekit-replica"]
    if r["kind"] == "stream":
        with client.completions.with_streaming_response.create(
                model="tiny", prompt=r["words"], max_tokens=r["max_tokens"], stream=True, **r["kw"]) as raw:
            text = "".join(c.choices[0].text for c in raw.parse() if c.choices)
            return text, raw.headers["x-decodekit-replica"]
    raw = client.completions.with_raw_response.create(model="tiny", prompt=r["words"],
                                                      max_tokens=r["max_tokens"], **r["kw"])
    return raw.parse().choices[0].text, raw.headers["x-decodekit-replica"]


def test_two_replicas_answer_like_one_process(tmp_path):
    import httpx
    import openai
    from _models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    chat_tokenizer().save_pretrained(tmp_path)
    work = _requests(50)
    oracle = tiny_llm(max_batch_size=4)
    want = [o.text for o in oracle.generate(
        [[{"role": "user", "content": r["words"]}] if r["kind"] == "chat" else r["words"] for r in work],
        [SamplingParams(max_new_tokens=r["max_tokens"], **r["kw"]) for r in work])]

    port = _free_port()
    args = [sys.executable, "-m", "decodekit", "serve", str(tmp_path), "--ray", "--replicas", "2", "--port",
            str(port), "--served-model-name", "tiny", "--max-batch-size", "4", "--max-seq-len", "160"]
    proc, url = start_server(args, timeout=240, RAY_USAGE_STATS_ENABLED="0")
    lines, reader = proc.lines, proc.reader
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        with ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(lambda r: _ask(client, r), work))
        assert [text for text, _ in seen] == want
        served = Counter(replica for _, replica in seen)
        assert len(served) == 2, served  # both replicas answered
        bad = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "w5", "top_p": 0},
                         timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p", bad.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, "".join(lines)[-4000:]
        reader.join(10)
        assert "shut down" in "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
