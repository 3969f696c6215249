"""pytest-benchmark entry points for the per-kernel cases (not part of `make test`):

    pytest bench/test_kernels_benchmark.py --benchmark-enable --benchmark-only   # or: make bench-pytest

Each case runs ours and the eager reference on the same inputs; pytest-benchmark
reports min/median/IQR per case and can compare runs (--benchmark-autosave,
--benchmark-compare).
"""
import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels import reference_sampler as RS

V, WINDOW = 65536, (4, 8196)


@pytest.fixture(scope="module")
def grpo_inputs():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 1024, V, generator=g) * 2).bfloat16()
    targets = torch.randint(*WINDOW, (2, 1024), generator=g)
    return logits, targets, torch.randn(2, generator=g)


@pytest.mark.parametrize("provider", ["mmr1", "reference"])
def test_token_logprobs(benchmark, grpo_inputs, provider):
    logits, targets, _ = grpo_inputs
    fn = (lambda: K.token_logprobs(logits, targets, vocab_range=WINDOW)) if provider == "mmr1" else \
        (lambda: R.token_logprobs(logits, targets, 1.0, *WINDOW)[0])
    benchmark(fn)


@pytest.mark.parametrize("provider", ["mmr1", "reference"])
def test_grpo_loss_fwd_bwd(benchmark, grpo_inputs, provider):
    logits, targets, adv = grpo_inputs
    loss_fn = K.grpo_loss if provider == "mmr1" else R.grpo_loss

    def run():
        x = logits.detach().requires_grad_(True)
        return torch.autograd.grad(loss_fn(x, targets, adv, vocab_range=WINDOW)[0], x)

    benchmark(run)


@pytest.mark.parametrize("provider", ["mmr1", "reference"])
def test_fused_linear_grpo(benchmark, provider):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(1, 1024, 512, generator=g), torch.randn(V, 512, generator=g) / 512**0.5
    t, adv = torch.randint(*WINDOW, (1, 1024), generator=g), torch.randn(1, generator=g)
    loss_fn = K.fused_linear_grpo_loss if provider == "mmr1" else R.fused_linear_grpo_loss

    def run():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        return torch.autograd.grad(loss_fn(hh, ww, t, adv, vocab_range=WINDOW)[0], (hh, ww))

    benchmark(run)


@pytest.mark.parametrize("provider", ["mmr1", "reference"])
def test_group_advantages(benchmark, provider):
    r = torch.rand(65536)
    fn = (lambda: K.group_advantages(r, group_size=8)) if provider == "mmr1" else \
        (lambda: R.group_advantages(r[:, None], torch.arange(65536) // 8, 8192))
    benchmark(fn)


@pytest.mark.parametrize("provider", ["mmr1", "reference"])
def test_cfg_sample(benchmark, provider):
    B = 32
    g = torch.Generator().manual_seed(0)
    c, u = (torch.randn(B, V, generator=g) * 3).bfloat16(), (torch.randn(B, V, generator=g) * 3).bfloat16()
    if provider == "mmr1":
        fn = lambda: K.cfg_sample(c, u, cfg_scale=4.0, top_k=2000, vocab_range=WINDOW, seed=1, offset=0)  # noqa: E731
    else:
        p = [torch.full((B,), 4.0), torch.ones(B), torch.full((B,), 2000), torch.ones(B)]
        fn = lambda: RS.cfg_sample(c, u, *p, None, 1, 0, torch.arange(B), *WINDOW)  # noqa: E731
    benchmark(fn)
