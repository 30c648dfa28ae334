"""Compile every Triton kernel, in every configuration the sampler launches, for real GPUs.

Run as a script (without TRITON_INTERPRET) by tests/test_kernels.py: the interpreter
accepts code that the compiler rejects, so this is what proves the kernels build. Each
kernel module lists its launch configurations (``aot_configs()``: constexpr combinations,
logits dtypes, num_warps), window variants included.
Prints one line per kernel and exits non-zero on failure.

    python tests/aot_compile.py [80] [90] [--sample]
"""

from __future__ import annotations

import collections
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from decodekit.kernels import accept, bands, lora, paged_attention, process, select, verify  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

MODULES = (process, bands, select, accept, verify, paged_attention, lora)


def jobs(sample: bool = False):
    """Every launch configuration; ``sample``: only the first and the last of each kernel's
    list (the default suite's quick pass; the slow suite compiles them all)."""
    for mod in MODULES:
        configs = list(mod.aot_configs())
        if sample:
            by_name = collections.defaultdict(list)
            for job in configs:
                by_name[job[0]].append(job)
            configs = [j for js in by_name.values() for j in ([js[0], js[-1]] if len(js) > 1 else js)]
        yield from configs


def main(archs=(80, 90), sample: bool = False) -> int:
    done: collections.Counter[str] = collections.Counter()
    for name, fn, sig, cfg, warps in jobs(sample):
        sig = dict(sig) | {k: "constexpr" for k in cfg}
        for cc in archs:
            src = ASTSource(fn=fn, signature=sig, constexprs=cfg)
            out = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
            if "cubin" not in out.asm or len(out.asm["cubin"]) == 0:
                print(f"FAILED {name} sm_{cc} {cfg}: no cubin")
                return 1
            done[name] += 1
    for name, n in done.items():
        print(f"{name}: {n}")
    print(f"compiled {sum(done.values())} kernel variants for sm_{'/sm_'.join(map(str, archs))}")
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--sample"]
    sys.exit(main(tuple(int(a) for a in args) or (80, 90), sample="--sample" in sys.argv))
