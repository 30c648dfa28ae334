"""The layout shared by the kernels and the slot state: plain Python ints, defined once.

Pure Python (no torch, no triton): ``decodekit.sampling.slot_state`` imports it on machines
without Triton, and the kernel modules wrap the values they read inside ``@triton.jit``
code as ``tl.constexpr`` (:mod:`decodekit.kernels._common`).
"""

from __future__ import annotations

# --------------------------------------------------------------------------- flag bits
# One int per slot (iparams[:, I_FLAGS]): which features the slot's request uses.
GREEDY = 1  # temperature 0: argmax, one-hot distribution
BIAS = 2  # dense bias row (logit_bias, allowed tokens, single-token bad words)
PENALTY = 4  # repetition / frequency / presence penalties (dense counts row)
SUPPRESS = 8  # EOS and stop ids suppressed until min_new_tokens are out
BADSEQ = 16  # multi-token bad words (history ring)
FILTER = 32  # top-k / top-p / min-p / typical-p (non-greedy rows only)
LOGPROB = 64  # the request asked for logprobs

# --------------------------------------------------------------------------- packed tables
# fparams [S, NF] float32 and iparams [S, NI] int32, one row per slot.
NF = 8
NI = 8
F_TEMP, F_TOPP, F_MINP, F_TYP, F_REP, F_FREQ, F_PRES = range(7)
I_TOPK, I_MINNEW, I_NGEN, I_FLAGS, I_NHIST, I_NLOGPROB = range(6)

# --------------------------------------------------------------------------- launches
BLOCK_PROCESS = 1024  # columns per tile of the process kernel
BLOCK_SELECT = 256  # columns per tile of the select kernel (times NUM_PIVOTS pivots)
BLOCK_VERIFY = 1024  # columns per tile of the verify kernel's races
NUM_PIVOTS = 16  # threshold pivots tested per pass over a row (select)
MAX_CHUNKS = 64  # programs per row of the process launch (partials combined by select)
NPART = 6  # floats per chunk partial: max, sum of exp, race key, raw max, raw sum of exp,
#            smallest finite processed value

# --------------------------------------------------------------------------- banded filtering
# (decodekit.sampling.few_pass: the algorithm and its argument; triton_kernels.bands)
NBINS = 1024  # histogram bins of d = max - l per row; the last one is the tail (d > range)
RMAX = 64.0  # widest range of d the bins cover
MARGIN = 1  # bins added on each side of a guessed threshold bin ...
SIDE = 4  # ... and more until the band holds this many tokens on each side of it
CAP = 4096  # candidates per row gathered by the gather pass
CAP_SMALL = 512  # the finish launch's narrow path: rows with at most this many candidates
NBAND = 4  # bands per row (top-k cut, top-p cut, typical-p's two edges)
NREG = 8  # regions per row between the bands (NBAND + 1, padded to a power of two)
NPLAN = 16  # int32 per row of the plan: band lows [NBAND], band highs [NBAND], candidates
BLOCK_BANDS = 1024  # columns per tile of the histogram and gather passes

# --------------------------------------------------------------------------- limits
MAX_VOCAB = 1 << 24  # token ids stay exact in the fp32 arithmetic of the kernels
HIST_SLACK = 64  # tokens rollback() may undo at once without losing bad-word history
MAX_WINDOW_DRAFTS = 64  # drafts per request in one window (held in registers)

# --------------------------------------------------------------------------- randomness
ACCEPT_LANE = 0x7FFFFFFF  # hash lane of the speculative acceptance uniforms (never a token id)
FLT_MAX = 3.4028234663852886e38
