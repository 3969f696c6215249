"""group_advantages: hand-computed values, every backend vs the fp64 reference, the numerical-safety rules."""
from __future__ import annotations

import math

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as R
from mmr1_kernels._library import op
from mmr1_kernels.advantages import MODES

from conftest import triton_device

NAN = float("nan")


def _std(xs, unbiased=True):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


def test_hand_computed_grpo_rloo_dr_grpo():
    r = torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    a, st = K.group_advantages(r, group_size=3)
    s = _std([1, 2, 4])
    expect = [(1 - 7 / 3) / (s + 1e-4), (2 - 7 / 3) / (s + 1e-4), (4 - 7 / 3) / (s + 1e-4), 0, 0, 0]
    torch.testing.assert_close(a, torch.tensor(expect))
    assert st["zero_std"].tolist() == [False, True] and st["zero_std_frac"].item() == 0.5
    a, _ = K.group_advantages(r, group_size=3, mode="rloo")
    torch.testing.assert_close(a, torch.tensor([1 - 3.0, 2 - 2.5, 4 - 1.5, 0, 0, 0]))
    a, _ = K.group_advantages(r, group_size=3, mode="dr_grpo")
    torch.testing.assert_close(a, torch.tensor([1 - 7 / 3, 2 - 7 / 3, 4 - 7 / 3, 0, 0, 0]))
    a, _ = K.group_advantages(r, group_size=3, mode="batch", unbiased=False)
    sb = _std([1, 2, 4, 5, 5, 5], unbiased=False)
    torch.testing.assert_close(a, torch.tensor([(1 - 7 / 3) / (sb + 1e-4), (2 - 7 / 3) / (sb + 1e-4),
                                                (4 - 7 / 3) / (sb + 1e-4), 0, 0, 0]))


def test_hand_computed_gdpo():
    r = torch.tensor([[1.0, 10.0], [3.0, 10.0], [0.0, 0.0], [0.0, 4.0]])
    w = torch.tensor([1.0, 0.5])
    a, _ = K.group_advantages(r, group_size=2, weights=w, mode="gdpo", eps=0.0)
    s = math.sqrt(2.0)  # unbiased std of a pair {x, x + 2} or {0, 4}/2...
    z0 = [(1 - 2) / s, (3 - 2) / s, 0.0, 0.0]  # column 0: group 2 is constant
    z1 = [0.0, 0.0, (0 - 2) / _std([0, 4]), (4 - 2) / _std([0, 4])]
    summed = [z0[i] + 0.5 * z1[i] for i in range(4)]
    m = sum(summed) / 4
    sd = _std(summed)
    torch.testing.assert_close(a, torch.tensor([(x - m) / sd for x in summed]))


def test_constant_group_is_exactly_zero_even_with_awkward_values():
    # 0.1 is not representable: E[x^2]-E[x]^2 leaves a residue; the shifted two-pass must not
    r = torch.full((4096,), 0.1, dtype=torch.float32)
    r[::2] = 1e6 + 0.3
    gid = torch.arange(4096) % 2  # two constant groups of 2048, interleaved labels
    for mode in MODES:
        a, st = K.group_advantages(r, gid, mode=mode)
        if mode != "gdpo" and mode != "batch":
            assert torch.all(a == 0), mode
        assert torch.all(st["group_std"] == 0)
        assert st["zero_std_frac"].item() == 1.0


def test_nan_rewards_are_excluded_and_get_zero():
    r = torch.tensor([1.0, NAN, 3.0, NAN, NAN, 2.0, 7.0])
    a, st = K.group_advantages(r, group_size=7 // 7 * 7)  # one group
    valid = [1.0, 3.0, 2.0, 7.0]
    m, s = sum(valid) / 4, _std(valid)
    exp = [(1 - m) / (s + 1e-4), 0, (3 - m) / (s + 1e-4), 0, 0, (2 - m) / (s + 1e-4), (7 - m) / (s + 1e-4)]
    torch.testing.assert_close(a, torch.tensor(exp))
    a, st = K.group_advantages(torch.tensor([NAN, NAN, 1.0, 2.0]), group_size=2)
    assert a[:2].tolist() == [0, 0] and math.isnan(st["group_mean"][0].item()) and not st["zero_std"][0]


def test_singletons_and_any_labels_any_order():
    r = torch.tensor([5.0, 1.0, 2.0, 9.0, 3.0])
    gid = torch.tensor([70, -3, 70, 12, -3])  # group 12 is a singleton
    a, st = K.group_advantages(r, gid)
    assert st["group_labels"].tolist() == [-3, 12, 70]
    assert a[3].item() == 0.0
    s = _std([5, 2])
    torch.testing.assert_close(a[[0, 2]], torch.tensor([1.5 / (s + 1e-4), -1.5 / (s + 1e-4)]))
    a, _ = K.group_advantages(r, gid, mode="rloo")
    torch.testing.assert_close(a, torch.tensor([3.0, -2.0, -3.0, 0.0, 2.0]))


def _random_case(N=257, R=3, nan_frac=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(N, R, generator=g, dtype=torch.float64)
    r[torch.rand(N, R, generator=g) < nan_frac] = NAN
    r[:8] = 0.25  # a constant group (labels below put rows 0..7 together)
    gid = torch.randint(1, 40, (N,), generator=g)
    gid[:8] = 0
    gid[8] = 999  # singleton
    return r, gid, torch.rand(R, generator=g, dtype=torch.float64) + 0.5


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("backend", ["ops", "triton"])
def test_backends_match_fp64_reference(request, mode, unbiased, backend):
    r, gid, w = _random_case()
    labels, index = torch.unique(gid, return_inverse=True)
    G = labels.numel()
    exp_adv, exp_mean, exp_std = R.group_advantages(r, index, G, w, mode, 1e-4, unbiased)
    if backend == "ops":
        adv, mean, std = op("group_advantages")(r, index, G, w, MODES[mode], 1e-4, unbiased)
        tol = dict(atol=1e-6, rtol=1e-6)
    else:
        kern = request.getfixturevalue("triton_kernels")
        dev = triton_device()
        adv, mean, std = (t.cpu() for t in kern.advantages.group_advantages(
            r.float().to(dev), index.to(dev), G, w.float().to(dev), MODES[mode], 1e-4, unbiased))
        tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(adv, exp_adv, **tol)
    torch.testing.assert_close(mean, exp_mean, equal_nan=True, **tol)
    torch.testing.assert_close(std, exp_std, **tol)
    if mode in ("grpo", "dr_grpo", "rloo", "batch"):
        assert torch.all(adv[:8] == 0), "constant group must give exactly 0"
        assert adv[8] == 0, "singleton must give 0"


def test_opcheck_and_compile():
    r, gid, w = _random_case(N=64)
    _, index = torch.unique(gid, return_inverse=True)
    G = int(index.max()) + 1
    torch.library.opcheck(op("group_advantages"), (r.float(), index, G, w.float(), 0, 1e-4, True))

    def f(rr):
        return K.group_advantages(rr, group_size=8, mode="grpo")[0] * 2

    rr = torch.randn(64)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(rr), f(rr))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rewards=torch.randn(6), group_size=4), ValueError, "must divide"),
    (dict(rewards=torch.randn(6)), ValueError, "exactly one of"),
    (dict(rewards=torch.randn(6), group_size=2, group_ids=torch.zeros(6, dtype=torch.long)), ValueError, "exactly one"),
    (dict(rewards=torch.randn(6), group_ids=torch.zeros(5, dtype=torch.long)), ValueError, "group_ids must have shape"),
    (dict(rewards=torch.randn(6), group_ids=torch.zeros(6)), TypeError, "group_ids must have dtype"),
    (dict(rewards=torch.tensor([1.0, float("inf")]), group_size=2), ValueError, "finite or NaN"),
    (dict(rewards=torch.randn(0), group_size=1), ValueError, "must not be empty"),
    (dict(rewards=torch.randn(4), group_size=2, mode="ppo"), ValueError, "mode must be one of"),
    (dict(rewards=torch.randn(4, 2), group_size=2, weights=torch.ones(3)), ValueError, "weights must have shape"),
    (dict(rewards=torch.randn(4), group_size=0), ValueError, "group_size must be a positive int"),
    (dict(rewards=torch.randint(0, 3, (4,)), group_size=2), TypeError, "rewards must have dtype"),
    (dict(rewards=torch.randn(4), group_size=2, eps=-1.0), ValueError, "eps must be >= 0"),
])
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        K.group_advantages(**kwargs)
