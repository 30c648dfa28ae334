"""Running a benchmark's ``--smoke`` command in a child process, with its peak memory."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_smoke(cmd: list[str], timeout: float = 600, max_rss_gb: float = 4.0) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; fails with its output if it exits non-zero, runs
    past ``timeout`` seconds or its peak resident memory exceeds ``max_rss_gb`` (a tiny model's
    benchmark needs under 1 GB; transformers 5.17's ``generate_batch`` once sized 22 GB of
    buffers from the free memory, and the CI machine killed the neighbouring tests)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chunks: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: chunks.__setitem__(k, f.read()), daemon=True)
               for k, f in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    deadline, timed_out = time.monotonic() + timeout, False
    while True:  # os.wait4 reaps the child and gives its own rusage (ru_maxrss in KiB on Linux)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            timed_out = True
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(30)
    out, err = chunks.get("out", ""), chunks.get("err", "")
    shown = f"\nstdout:\n{out}\nstderr:\n{err}"
    assert not timed_out, f"timed out after {timeout} s" + shown
    assert proc.returncode == 0, f"exit code {proc.returncode}" + shown
    peak_gb = usage.ru_maxrss / 2**20
    assert peak_gb <= max_rss_gb, f"peak memory {peak_gb:.1f} GB > {max_rss_gb} GB" + shown
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
