"""Shared pieces of the server tests: a tiny model with a chat template, an offline oracle
LLM on its own copy of the weights, and reading the server's state."""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from _models import tiny_model, word_tokenizer

from decodekit import LLM

REPO = Path(__file__).resolve().parent.parent

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w3{% endif %}")


@functools.cache
def chat_tokenizer():
    """The word tokenizer with a chat template (roles are unknown words: the pad id)."""
    tok = copy.deepcopy(word_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llm(**kw) -> LLM:
    """An LLM on a private copy of the tiny llama (server and oracle never share weights or hooks)."""
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_seq_len", 160)
    return LLM(model=copy.deepcopy(tiny_model("llama")), tokenizer=chat_tokenizer(), **kw)


def wait_idle(server, timeout: float = 10.0) -> None:
    """Wait until the server's engine holds no job and every slot is free; fail otherwise."""
    gen = server.engine.gen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine.idle and len(gen.free_slots) == gen.max_batch_size and not server.engine.running:
            return
        time.sleep(0.02)
    raise AssertionError(f"server not idle after {timeout} s: idle={server.engine.idle}, "
                         f"free slots {gen.free_slots}, running {server.engine.running}")


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def start_server(args: list[str], timeout: float = 120.0, **env: str) -> tuple[subprocess.Popen, str]:
    """Start ``args`` (a ``decodekit serve`` command line) from the repository root and wait
    for the URL it prints once it listens. Its output is read in the background and kept on
    ``proc.lines`` (a chatty server never blocks on a full pipe; ``proc.reader`` is the
    thread). Fails with the output's tail if the server exits or prints no URL in time."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stdout), daemon=True)
    proc.reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        found = (re.search(r"on (http://\S+) ", line) for line in list(proc.lines))
        url = next((m.group(1) for m in found if m), None)
        if url:
            return proc, url
        time.sleep(0.05)
    proc.kill()
    proc.wait(30)
    raise AssertionError("the server did not start:\n" + "".join(proc.lines)[-4000:])
