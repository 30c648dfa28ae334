"""The command line: the demo end to end and argparse-style errors."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from decodekit.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decodekit", *args], capture_output=True,
                          text=True, timeout=300)


def run_here(*args: str) -> subprocess.CompletedProcess:
    """``main`` in this process (argument errors without a new interpreter each): its exit
    code and streams; an exception that ``main`` lets escape fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_demo_runs_and_checks_exactness():
    r = run("demo", "--vocab-size", "2000", "--steps", "3", "--draws", "3000")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    rows = [ln for ln in lines if ln.strip()[:1].isdigit() and "  " in ln]
    assert len(rows) >= 8  # one line per demo request
    greedy = next(ln for ln in rows if "greedy" in ln)
    assert greedy.split()[-3:] == ["0", "0", "0"]  # Zipf rank 1 is token 0
    assert "exactness" in r.stdout and "-> OK" in r.stdout


def test_bad_arguments_are_argparse_errors():
    for args in (["demo", "--vocab-size", "10"], ["demo", "--steps", "x"], ["nope"], []):
        r = run_here(*args)
        assert r.returncode == 2, (args, r.stdout)
        assert "usage:" in r.stderr and "Traceback" not in r.stderr
    r = run("nope")  # and as a process: exit code 2, usage, no traceback
    assert r.returncode == 2 and "usage:" in r.stderr and "Traceback" not in r.stderr


def test_generate_on_the_embedded_model():
    r = run("generate", "What is the capital of France?", "--chat", "--temperature", "0",
            "--max-new-tokens", "12", "--truncate-prompt-tokens", "-1")
    assert r.returncode == 0, r.stderr[-2000:]
    text, summary = r.stdout.rsplit("\n", 2)[0], r.stdout.strip().splitlines()[-1]
    assert "Paris" in text
    assert summary.startswith("[") and "tokens/s" in summary and "finish=" in summary


def test_generate_with_ngram_speculation_reports_acceptance():
    r = run("generate", "Repeat exactly: the red fox and the blue fox met the green fox.",
            "--chat", "--temperature", "0", "--max-new-tokens", "24", "--draft", "ngram",
            "--num-speculative-tokens", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "acceptance" in r.stdout and "mean accepted length" in r.stdout


def test_generate_with_layer_skip_draft():
    r = run("generate", "Name a fruit.", "--chat", "--temperature", "0", "--max-new-tokens", "12",
            "--draft", "layerskip:0-9,20-29", "--num-speculative-tokens", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "draft layerskip:0-9,20-29 k=2: acceptance" in r.stdout


def test_generate_bad_arguments():
    for args in (["generate", "x", "--top-p", "0"], ["generate", "x", "--temperature", "-1"],
                 ["generate", "x", "--max-new-tokens", "0"],
                 ["generate"]):
        r = run_here(*args)
        assert r.returncode == 2, (args, r.stdout)
        assert "usage:" in r.stderr and "Traceback" not in r.stderr
    for args in (["--model", "/nonexistent/model"], ["--draft", "/nonexistent/draft"],
                 ["--truncate-prompt-tokens", "0"],
                 ["--draft", "layerskip:40"], ["--draft", "layerskip:a-b"]):
        r = run_here("generate", "x", *args)
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, args


def test_steer_train_then_generate_with_the_vector(tmp_path):
    import json

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"positive": f"Answer briefly. Question {i}? Yes.",
             "negative": f"Answer at length. Question {i}? Well, there is a great deal to say, starting with"}
            for i in range(6)]
    pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "v.safetensors"
    r = run("steer", "train", "--pairs", str(pairs), "--layers", "8-10", "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained mean_diff on 6 pairs, layers [8, 9, 10] (hidden size 576)" in r.stdout
    from decodekit import SteeringVector

    vec = SteeringVector.load(out)
    assert vec.layers == (8, 9, 10) and vec.hidden_size == 576
    args = ("generate", "Name a fruit.", "--chat", "--temperature", "0", "--max-new-tokens", "8",
            "--no-stream")
    plain = run(*args)
    steered = run(*args, "--steer", str(out), "--steer-strength", "0.2")
    assert plain.returncode == 0 and steered.returncode == 0, steered.stderr[-2000:]
    assert plain.stdout.splitlines()[0] != steered.stdout.splitlines()[0]


def test_steer_bad_arguments(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a", "negative": "b"}\nnot json\n')
    vout = str(tmp_path / "v.safetensors")
    cases = [("steer", "train", "--pairs", str(bad), "--layers", "1-2", "-o", vout),
             ("steer", "train", "--pairs", str(tmp_path / "missing.jsonl"), "--layers", "1", "-o", "x"),
             ("generate", "x", "--steer", "nonexistent-preset"),
             ("generate", "x", "--steer-strength", "2")]
    for args in cases:
        r = run_here(*args)
        assert r.returncode == 2 and "error" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert "bad.jsonl:2: not JSON" in run_here(*cases[0]).stderr
