"""Compile every Triton kernel, in every configuration the sampler launches, for real GPUs.

Run as a script (without TRITON_INTERPRET) by tests/test_kernels_aot.py: the interpreter
accepts code that the compiler rejects, so this is what proves the kernels build.
Prints one line per compiled (kernel, target, config) and exits non-zero on failure.
"""

from __future__ import annotations

import itertools
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from decodekit.kernels import draw, process, verify  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from decodekit import sampler as S  # noqa: E402

P, F, I, I64 = "*fp32", "*fp32", "*i32", "*i64"


def process_configs():
    for bias, pen, sup, bad, work, raw in itertools.product([False, True], repeat=6):
        for ldt in ("*fp32", "*fp16", "*bf16"):
            if ldt != "*fp32" and (bias or pen or sup or bad):
                continue  # dtype only changes the first load; cover it with the plain paths
            yield ldt, dict(HAS_BIAS=bias, HAS_PENALTY=pen, HAS_SUPPRESS=sup, HAS_BADSEQ=bad,
                            WRITE_WORK=work, NEED_RAW=raw, NSP=8 if sup else 1,
                            NBP=4 if bad else 1, LP=4 if bad else 1, BLOCK=S.BLOCK_PROCESS)


def process_sig(ldt):
    return {
        "logits_ptr": ldt, "stride_l": "i32", "slots_ptr": I, "fparams_ptr": F,
        "iparams_ptr": I, "seed_ptr": I64, "bias_ptr": F, "counts_ptr": I,
        "suppress_ptr": I, "badseq_ptr": I, "badlen_ptr": I, "hist_ptr": I, "work_ptr": F,
        "part_f_ptr": F, "part_i_ptr": I, "V": "i32", "chunk": "i32", "H": "i32",
    }


def select_configs():
    for filt, pen, hist, lp, probs in itertools.product(
        [False, True], [False, True], [False, True], [0, 1, 2], [False, True]
    ):
        if probs and (pen or hist or lp):
            continue
        yield dict(HAS_FILTER=filt, HAS_PENALTY=pen, HAS_HIST=hist, LOGPROB=lp, PROBS=probs,
                   COMMIT=not probs, BLOCK=S.BLOCK_SELECT, NP=draw.NUM_PIVOTS)


def select_sig(ldt):
    return {
        "logits_ptr": ldt, "stride_l": "i32", "slots_ptr": I, "fparams_ptr": F,
        "iparams_ptr": I, "seed_ptr": I64, "counts_ptr": I, "hist_ptr": I, "work_ptr": F,
        "part_f_ptr": F, "part_i_ptr": I, "out_tok_ptr": I64, "out_lp_ptr": F,
        "probs_ptr": F, "V": "i32", "n_chunks": "i32", "H": "i32",
    }


def accept_sig():
    return {"tok_ptr": I, "stride_t": "i32", "n_tok": "i32", "slots_ptr": I, "iparams_ptr": I,
            "counts_ptr": I, "hist_ptr": I, "V": "i32", "H": "i32"}


def verify_sig():
    return {"p_ptr": F, "q_ptr": F, "draft_ptr": I, "n_draft_ptr": I, "seed_ptr": I64,
            "pos_ptr": I64, "out_ptr": I64, "n_acc_ptr": I, "V": "i32", "K": "i32"}


def jobs():
    for ldt, cfg in process_configs():
        yield "process", process._process_kernel, process_sig(ldt), cfg
    for ldt in ("*fp32", "*bf16"):
        for cfg in select_configs():
            yield "select", draw._select_kernel, select_sig(ldt), cfg
    for pen, hist in itertools.product([False, True], repeat=2):
        yield "accept", draw._accept_kernel, accept_sig(), dict(HAS_PENALTY=pen, HAS_HIST=hist)
    for has_q in (False, True):
        yield "verify", verify._verify_kernel, verify_sig(), dict(HAS_Q=has_q,
                                                                  BLOCK=verify.BLOCK_VERIFY)


def main(archs=(80, 90)) -> int:
    n = 0
    for name, fn, sig, cfg in jobs():
        sig = dict(sig)
        for k in cfg:
            sig[k] = "constexpr"
        for cc in archs:
            src = ASTSource(fn=fn, signature=sig, constexprs=cfg)
            out = triton.compile(src, target=GPUTarget("cuda", cc, 32))
            if "cubin" not in out.asm or len(out.asm["cubin"]) == 0:
                print(f"FAILED {name} sm_{cc} {cfg}: no cubin")
                return 1
            n += 1
    print(f"compiled {n} kernel variants for sm_{'/sm_'.join(map(str, archs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(tuple(int(a) for a in sys.argv[1:]) or (80, 90)))
