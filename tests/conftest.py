"""Test configuration: without a GPU the Triton kernels run in the interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (it is read when
``@triton.jit`` decorates), so it is set here, at collection time.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# The interpreter evaluates the uint32 hash in numpy, which warns on the (intended)
# wrap-around of 32-bit multiplication.
warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning)
warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# pytest-xdist (`-n N`): the workers share the cores, so each takes its share of torch threads
# (N workers x all the cores' threads would oversubscribe them).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


@pytest.fixture
def one_thread():
    """Run a model-heavy test on one torch thread (tiny models: thread start-up dominates,
    and the machine's other core stays free), restoring the setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
