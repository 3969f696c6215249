"""The ``mmr1`` torch.library namespace: op schemas, and which backend serves which device.

Every op is declared once here. Implementations are registered per dispatch key:

- ``CompositeExplicitAutograd``: the pure-PyTorch reference (mmr1_kernels.reference),
  the fallback for any device without a dedicated kernel;
- ``CPU``: the C++ kernels in csrc/, compiled into ``mmr1_kernels/_C.so`` and loaded
  here with ``torch.ops.load_library`` (they register with TORCH_LIBRARY_IMPL);
- ``CUDA``: the Triton kernels (mmr1_kernels.gpu), when triton is installed.

A more specific key wins, so CPU tensors use the C++ kernels whenever the
extension is built, and the reference otherwise (with a one-time warning saying
how to build it).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

NAMESPACE = "mmr1"

SCHEMAS = {
    "token_logprobs": (
        "token_logprobs(Tensor logits, Tensor targets, Tensor? mask, float temperature, "
        "int vocab_lo, int vocab_hi, bool with_entropy=False) -> (Tensor logprobs, Tensor lse, Tensor entropy)"
    ),
    "grpo_token_loss": (
        "grpo_token_loss(Tensor logits, Tensor targets, Tensor advantages, Tensor? mask, "
        "Tensor? old_logprobs, Tensor? ref_logprobs, float temperature, int vocab_lo, int vocab_hi, "
        "float eps_low, float eps_high, float beta, bool inplace_backward=False) -> (Tensor logprobs, Tensor lse, Tensor token_loss, "
        "Tensor dloss_dlogp, Tensor ratio, Tensor kl)"
    ),
    "logprob_backward": (
        "logprob_backward(Tensor logits, Tensor targets, Tensor lse, Tensor grad_logprobs, "
        "float temperature, int vocab_lo, int vocab_hi, Tensor? entropy=None, Tensor? grad_entropy=None) -> Tensor"
    ),
    "logprob_backward_": (
        "logprob_backward_(Tensor(a!) logits, Tensor targets, Tensor lse, Tensor grad_logprobs, "
        "float temperature, int vocab_lo, int vocab_hi, Tensor? entropy=None, Tensor? grad_entropy=None) -> ()"
    ),
    "cfg_sample": (
        "cfg_sample(Tensor cond, Tensor? uncond, Tensor cfg_scale, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor? forced, Tensor seed, Tensor offset, Tensor row_ids, int vocab_lo, int vocab_hi, "
        "bool return_cond_logprobs) -> (Tensor tokens, Tensor logprobs, Tensor cond_logprobs, Tensor status)"
    ),
    "decode_attention": (
        "decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, Tensor? prefix_k, Tensor? prefix_v, "
        "Tensor? prefix_lengths, Tensor? prefix_of_row, float scale) -> (Tensor out, Tensor lse)"
    ),
    "zeros_untouched": "zeros_untouched(Tensor like, int[] size, ScalarType dtype) -> Tensor",
    "group_advantages": (
        "group_advantages(Tensor rewards, Tensor group_index, int num_groups, Tensor? weights, "
        "int mode, float eps, bool unbiased) -> (Tensor advantages, Tensor group_mean, Tensor group_std)"
    ),
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    _lib.define(_schema)

def _find_extension() -> Path:
    # setup.py names it like a Python extension (_C.cpython-311-x86_64-linux-gnu.so);
    # a manual CMake build gives _C.so.
    here = Path(__file__).parent
    found = sorted(here.glob("_C*.so"))
    return found[0] if found else here / "_C.so"


_EXT_PATH = _find_extension()
_BUILD_HINT = "pip install --no-build-isolation -e .  (or: make build)"


def _missing(message: str) -> bool:
    """A missing or unloadable extension: a warning (CPU tensors then run the reference), or with
    MMR1_REQUIRE_CPP=1 (what `make test` and CI set) an ImportError, so no test silently compares the reference
    with itself."""
    if os.environ.get("MMR1_REQUIRE_CPP") == "1":
        raise ImportError(f"{message}; MMR1_REQUIRE_CPP=1 requires the C++ kernels. Build them with: {_BUILD_HINT}")
    warnings.warn(f"{message}; CPU tensors use the slower pure-PyTorch reference. Build them with: {_BUILD_HINT}",
                  RuntimeWarning, stacklevel=4)
    return False


def _load_extension() -> bool:
    if os.environ.get("MMR1_DISABLE_CPP") == "1":  # an explicit opt-out (a pure-Python install, benchmarks)
        return False
    if not _EXT_PATH.exists():
        return _missing(f"mmr1_kernels: the C++ CPU kernels are not built ({_EXT_PATH.name} missing)")
    try:
        torch.ops.load_library(str(_EXT_PATH))
    except OSError as err:  # e.g. built against another torch version
        return _missing(f"mmr1_kernels: could not load {_EXT_PATH} ({err})")
    return True


HAS_CPP = _load_extension()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def op(name: str) -> torch._ops.OpOverload:
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def impl(name: str, key: str):
    """Decorator registering ``fn`` as the implementation of ``mmr1::name`` for a dispatch key."""

    def register(fn):
        _lib.impl(name, fn, key)
        return fn

    return register


def backend_for(device: torch.device) -> str:
    """The backend that serves tensors on ``device`` (for logs and benchmark tables)."""
    if device.type == "cpu":
        return "cpp" if HAS_CPP else "reference"
    if device.type == "cuda" and HAS_TRITON:
        return "triton"
    return "reference"
