"""One rank of the tensor-parallel test (run by ``torchrun --nproc_per_node 2``; see
tests/test_tensor_parallel.py). Loads the saved tiny model with transformers' TP plan, runs
the same workload on every rank, and writes the rank's tokens as JSON; the test compares the
ranks with each other and with a single process.

    torchrun --nproc_per_node 2 tests/_tp_worker.py MODEL_DIR OUT_DIR [--single]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def workload():
    """(prompts, params, steering keywords, drafter) of every run, fixed."""
    from decodekit import SamplingParams

    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10, 11], [1, 40, 41, 42, 43, 40, 41], [1, 77]]
    plain = [SamplingParams(max_new_tokens=12, temperature=0),  # greedy
             SamplingParams(max_new_tokens=12, seed=7, top_p=0.9),  # seeded
             SamplingParams(max_new_tokens=12, temperature=0.8),  # unseeded: the shared generator seed
             SamplingParams(max_new_tokens=12, seed=3, n=2)]  # forks
    return prompts, plain


def run(model, tok) -> dict[str, list]:
    from decodekit import LLM, NGramDraft, SteeringVector

    prompts, params = workload()
    out = {}
    llm = LLM(model=model, tokenizer=tok, seed=1234, max_batch_size=3, max_seq_len=96)
    out["plain"] = [[o.token_ids for o in r.outputs] for r in llm.generate(prompts, params)]
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({0: 0.5 * torch.randn(64, generator=g), 1: 0.5 * torch.randn(64, generator=g)})
    out["steered"] = [r.token_ids for r in llm.generate(prompts, params[:3] + params[1:2],
                                                        steering_vector=dict(vec), steering_strength=2.0)]
    spec = LLM(model=model, tokenizer=tok, seed=99, max_batch_size=4, max_seq_len=96, draft=NGramDraft())
    out["ngram"] = [r.token_ids for r in spec.generate(prompts, params[:3] + params[1:2])]
    gen = spec.generator  # joins and cancellations through the per-step API
    a = gen.new_context(prompts[0], params[2])
    b = gen.new_context(prompts[1], params[1])
    steps = []
    batch = {a.request_id: a}
    for step in range(8):
        if step == 2:
            batch[b.request_id] = b
        if step == 5:
            gen.release(batch.pop(a.request_id))
        res = gen.next_token(batch)
        steps.append({("a" if rid == a.request_id else "b"): [t.next_token for t in r.tokens]
                      for rid, r in res.items()})
    out["per_step"] = steps
    return out


def main() -> None:
    import faulthandler
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a hang (a collective one rank never reaches) prints where each rank waits, then exits
    faulthandler.dump_traceback_later(float(os.environ.get("TP_WORKER_TIMEOUT", "150")), exit=True)
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    single = "--single" in sys.argv
    torch.set_num_threads(1)
    if single:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rank = "single"
    else:
        torch.distributed.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto")
        rank = str(torch.distributed.get_rank())
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = run(model.eval(), tok)
    if not single:  # what TP cannot run is refused at construction
        from decodekit import LLM
        try:
            LLM(model=model, tokenizer=tok, seed=1, max_loras=1)
        except ValueError as exc:
            assert "max_loras=0" in str(exc), exc
        else:
            raise AssertionError("LoRA under tensor parallelism was not refused")
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(out))
    if not single:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
