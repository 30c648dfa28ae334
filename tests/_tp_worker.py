"""One rank of the tensor-parallel test (run by ``torchrun --nproc_per_node 2``; see
tests/test_tensor_parallel.py). Loads the saved tiny model with transformers' TP plan, runs
the same workload on every rank, and writes the rank's tokens as JSON; the test compares the
ranks with each other and with a single process.

    torchrun --nproc_per_node 2 tests/_tp_worker.py MODEL_DIR OUT_DIR [--single] [--guided | --pp]
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


def run(model, tok, whole) -> dict[str, list]:
    """``whole``: the same model unsharded (every rank holds all of it: a replicated draft)."""
    from decodekit import LLM, DraftModel, LayerSkipDraft, NGramDraft, SteeringVector

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
    # the draft plan's window costs are timed: every rank must plan with the same (rank 0's)
    out["window_cost"] = [list(p) for p in gen.speculative.policy.cost.points]
    # layer skip (the target's own first layer) and a replicated draft model, with a given
    # window cost: the same plan as the single process, so sampled tokens are comparable too
    fixed = {1: 1.0, 4: 1.3, 16: 2.0}
    for name, draft in (("layerskip", LayerSkipDraft(1, k=2)), ("draft_model", DraftModel(whole, k=3))):
        llm = LLM(model=model, tokenizer=tok, seed=5, max_batch_size=4, max_seq_len=96, draft=draft,
                  window_cost=fixed)
        out[name] = [r.token_ids for r in llm.generate(prompts, params[:3] + params[1:2])]
    return out


def run_lora(model, tok, adapters: Path) -> dict[str, list]:
    """Per-request LoRA (adapters a: q,v r=8; b: q,k,o,down r=4 rsLoRA; o and down are row-wise
    under TP): a mixed batch [none, a, b, a] greedy, seeded and unseeded, plain, with n-gram
    and with layer-skip speculation (the draft keeps layer 0's adapters); the logits of one
    mixed forward through the Triton kernels (interpreter) and the torch path; and, on the
    ranks, the same forward without the row-wise all-reduce (a negative control the test must
    see differ)."""
    from decodekit import LayerSkipDraft, NGramDraft, SamplingParams, TokenGenerator

    prompts, _ = workload()
    rows = [None, "a", "b", "a"]
    params = [SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True),
              SamplingParams(max_new_tokens=10, seed=7, top_p=0.9, ignore_eos=True),
              SamplingParams(max_new_tokens=10, temperature=0.8, ignore_eos=True),
              SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True)]
    out = {}
    drafts = (("lora", None), ("lora_ngram", NGramDraft(k=3)), ("lora_skip", LayerSkipDraft(1, k=2)))
    for key, draft in drafts:
        gen = TokenGenerator(model, tok, max_batch_size=4, max_seq_len=96, seed=21, max_loras=3,
                             max_lora_rank=8, draft=draft, window_cost={1: 1.0, 4: 1.3, 16: 2.0})
        for name in ("a", "b"):
            res = gen.load_lora(name, adapters / f"lora-{name}")
            assert res.ok, res.message
        # an adapter only rank 0 can read: no rank keeps it (the tables stay alike)
        path = adapters / ("lora-a" if torch.distributed.get_rank() == 0 else "no-such-adapter") \
            if torch.distributed.is_initialized() else adapters / "no-such-adapter"
        res = gen.load_lora("c", path)
        out[key + "_one_rank"] = [res.status.name, list(gen.loras)]
        ctxs = [gen.new_context(p, sp, lora=name) for p, sp, name in zip(prompts, params, rows, strict=True)]
        while any(not c.is_done for c in ctxs):
            gen.next_token({c.request_id: c for c in ctxs if not c.is_done}, num_steps=3)
        out[key] = [c.generated_token_ids for c in ctxs]
    ids = torch.tensor([[1, 5, 6, 7], [1, 9, 10, 11], [1, 40, 41, 42], [1, 77, 5, 6]])
    for backend in ("triton", "torch"):
        out[f"lora_logits_{backend}"] = _lora_forward(model, adapters, rows, ids, backend)
    if torch.distributed.is_initialized():
        out["lora_logits_no_reduce"] = _lora_forward(model, adapters, rows, ids, "torch", reduce=False)
    return out


def _lora_forward(model, adapters: Path, rows, ids, backend: str, reduce: bool = True) -> list:
    from decodekit.lora import LoRAHooks, LoRATables

    tables = LoRATables(model, 2, 8)
    if not reduce:
        tables.reduce_meshes = [None] * len(tables.reduce_meshes)
    for name in ("a", "b"):
        tables.load(name, tables.read(adapters / f"lora-{name}"))
    hooks = LoRAHooks(model, tables, len(rows), backend=backend)
    for row, name in enumerate(rows):
        hooks.set_row(row, name)
    with torch.no_grad(), hooks.bound(0, tuple(ids.shape)):
        logits = model(input_ids=ids).logits
    hooks.remove()
    return logits[:, -1].tolist()


def run_guided(model, tok, whole) -> dict[str, list]:
    """Guided decoding (regex, choice, JSON schema; greedy and seeded) and an ensemble with a
    replicated member, on a model over a real tokenizer's vocabulary."""
    from decodekit import LLM, GuidedDecodingParams, SamplingParams

    prompts = ["The code is", "Answer:", "A person:", "Hello"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    specs = [GuidedDecodingParams(regex=r"[0-9]{3}-[0-9]{4}"),
             GuidedDecodingParams(choice=["yes", "no", "maybe"]),
             GuidedDecodingParams(json=schema, disable_any_whitespace=True), None]
    kws = [dict(temperature=0), dict(seed=5), dict(seed=6), dict(seed=7)]
    params = [SamplingParams(max_new_tokens=16, guided_decoding=g, **kw)
              for g, kw in zip(specs, kws, strict=True)]
    out = {}
    llm = LLM(model=model, tokenizer=tok, seed=11, max_batch_size=4, max_seq_len=64)
    out["guided"] = [r.token_ids for r in llm.generate(prompts, params)]
    out["guided_text"] = [r.text for r in llm.generate(prompts, params)]
    ens = LLM(model=model, tokenizer=tok, seed=11, max_batch_size=4, max_seq_len=64, ensemble_models=[whole],
              ensemble_weights=[1.0, 0.5])
    out["ensemble"] = [r.token_ids for r in ens.generate(prompts, [SamplingParams(max_new_tokens=12, seed=s)
                                                                    for s in range(4)])]
    return out


def main() -> None:
    import faulthandler
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.distributed import DistributedConfig

    # a hang (a collective one rank never reaches) prints where each rank waits, then exits
    faulthandler.dump_traceback_later(float(os.environ.get("TP_WORKER_TIMEOUT", "150")), exit=True)
    model_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    single = "--single" in sys.argv
    torch.set_num_threads(1)
    if "--pp" in sys.argv:  # pipeline stages: refused at construction, saying what to use
        from decodekit import LLM

        torch.distributed.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, distributed_config=DistributedConfig(pp_size=2))
        try:
            LLM(model=model, tokenizer=AutoTokenizer.from_pretrained(model_dir))
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError("a pipeline-parallel model was not refused")
        (out_dir / f"pp-rank-{torch.distributed.get_rank()}.txt").write_text(message)
        torch.distributed.destroy_process_group()
        return
    if single:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        rank = "single"
    else:
        torch.distributed.init_process_group("gloo")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto"))
        rank = str(torch.distributed.get_rank())
    tok = AutoTokenizer.from_pretrained(model_dir)
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if "--guided" in sys.argv:
        out = run_guided(model.eval(), tok, whole)
    else:
        out = run(model.eval(), tok, whole)
        if (model_dir / "lora-a").is_dir():
            out.update(run_lora(model.eval(), tok, model_dir))
    if not single and "--guided" not in sys.argv:  # what TP cannot run is refused at construction
        from decodekit import LLM, DraftModel
        for kw, expect in ((dict(model=whole, draft=DraftModel(model)), "sharded over 2 ranks"),):
            try:
                LLM(tokenizer=tok, seed=1, **kw)
            except ValueError as exc:
                assert expect in str(exc), exc
            else:
                raise AssertionError(f"not refused: {expect}")
    (out_dir / f"rank-{rank}.json").write_text(json.dumps(out))
    if not single:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
