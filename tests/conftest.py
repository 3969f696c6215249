"""Shared test helpers: one tolerance table per dtype, backends, and the fp64 oracle."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Without a GPU the Triton kernels run on CPU tensors through the interpreter.
# triton decides at @triton.jit time, so this must precede every kernel import.
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mmr1_kernels  # noqa: E402,F401  (registers the ops)
from mmr1_kernels._library import HAS_CPP, HAS_TRITON  # noqa: E402

# (atol, rtol) of a kernel's fp32 result against the fp64 reference evaluated on
# the *same* (already rounded) inputs: the input dtype only changes what is read,
# all math is fp32, so one row of the table per input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-5, 2e-5),
    torch.float16: (2e-5, 2e-5),
}
# Gradients are written in the logits dtype: the tolerance is that dtype's rounding.
GRAD_TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-4, 1e-2),
    torch.float16: (1e-6, 2e-3),
}


def assert_close(actual, expected, dtype, grad=False, msg=""):
    atol, rtol = (GRAD_TOLERANCES if grad else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True, msg=msg)


requires_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built (pip install --no-build-isolation -e .)")


def triton_device() -> str:
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture
def triton_kernels():
    """The Triton launchers, runnable here: on the GPU, or on CPU tensors under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    from mmr1_kernels.gpu import advantages, logprob

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy: -inf - -inf in masked lanes
        yield type("TritonKernels", (), {"logprob": logprob, "advantages": advantages})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
