"""mmr1_kernels: fused kernels for GRPO on autoregressive (image) generators.

Public ops (each validates its arguments and dispatches by device: C++ on CPU,
Triton on CUDA, the pure-PyTorch reference elsewhere; all are torch.library
ops under ``torch.ops.mmr1`` and compose with torch.compile):

- token_logprobs, grpo_loss                      from logits
- fused_linear_logprobs, fused_linear_grpo_loss  from hidden states + head weight
- policy_loss, PolicyLossConfig                  TRL GRPOTrainer's loss surface over per-token log-probs
                                                 (8 loss types, GSPO, IS correction, masks, entropy bonus)
- group_advantages                               group-relative advantages
- cfg_sample                                     fused CFG / top-k / top-p sampler (Philox Gumbel-max)
- decode_attention                               attention over a rollout's KV cache: per-row lengths, shared
                                                 prompt prefixes (one copy per group), GQA, Jacobi windows
- shared_prefix_attention                        the same shape in training: G completions over one copy of their
                                                 prompt, differentiable

The contract every backend meets: docs/kernel-semantics.md.
"""
from ._library import HAS_CPP, HAS_TRITON, backend_for
from .logprob import grpo_loss, token_logprobs
from .fused_linear import fused_linear_grpo_loss, fused_linear_logprobs
from .advantages import group_advantages
from .policy import PolicyLossConfig, importance_sampling_ratio, policy_loss
from .sampler import cfg_sample
from .attention import decode_attention, shared_prefix_attention
from . import reference

__all__ = [
    "token_logprobs", "grpo_loss", "cfg_sample", "fused_linear_logprobs", "fused_linear_grpo_loss", "group_advantages",
    "decode_attention", "shared_prefix_attention", "policy_loss", "PolicyLossConfig", "importance_sampling_ratio", "reference", "backend_for", "HAS_CPP", "HAS_TRITON",
]
__version__ = "0.1.0"
