"""shared_prefix_attention (the policy update's attention: G completions per prompt over one copy of the prompt):
value and gradients of both implementations against the fp64 oracle's autograd (tests/oracle.py), with tolerances
from error analysis (tests/tolerance.py), gradcheck, odd shapes, errors, torch.compile."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K

import oracle as O
import tolerance as TOL

# P prompts, G rows each, T own positions, H heads, Hkv kv heads, D head dim, Sp prefix slots
CASES = {
    "MHA, G=4": (2, 4, 6, 4, 4, 16, 9),
    "GQA 4:1, odd head dim": (3, 2, 5, 8, 2, 24, 7),
    "MQA, one prompt, G=3": (1, 3, 4, 4, 1, 32, 11),
    "head dim 128, GQA 2:1": (2, 2, 3, 4, 2, 128, 5),
    "one position per row, G=1": (3, 1, 1, 2, 2, 8, 4),
}
IMPLS = ["merge", "gather"]


def make_inputs(P, G, T, H, Hkv, D, Sp, dtype, seed=0, spread=1.0):
    """Inputs in ``dtype``; prefix lengths cover 0 (a row that sees only itself) and Sp."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * spread).to(dtype)  # noqa: E731
    N = P * G
    q, k, v = rnd(N, T, H, D), rnd(N, T, Hkv, D), rnd(N, T, Hkv, D)
    pk, pv = rnd(P, Sp, Hkv, D), rnd(P, Sp, Hkv, D)
    plen = torch.randint(1, Sp + 1, (P,), generator=g)
    plen[-1] = Sp
    if P > 1:
        plen[0] = 0
    return q, k, v, pk, pv, plen, rnd(N, T, H, D)


def oracle_with_grads(q, k, v, pk, pv, plen, grad_out, scale=None):
    """The oracle (decode_attention with W = T, no own slots before the window) and its autograd gradients, fp64."""
    N, T = q.shape[:2]
    P = pk.shape[0]
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    out, _, _ = O.decode_attention(ins[0], ins[1], ins[2], torch.zeros(N, dtype=torch.long),
                                   (ins[3], ins[4], plen, torch.arange(P).repeat_interleave(N // P)), scale)
    return out.detach(), torch.autograd.grad(out, ins, grad_out.double())


def tolerances(dtype, q, k, v, pk, pv, plen, grad_out, scale, p_unit):
    """attention_grad_errors over each row's concatenation [prompt; own], mapped back to the inputs: a prompt slot's
    tolerance sums its G rows', a kv head's its query heads'."""
    N, T, H, D = q.shape
    P, Sp, Hkv, _ = pk.shape
    rep, G = H // Hkv, N // P
    of_row = torch.arange(P).repeat_interleave(G)
    ex = lambda t: t.double().repeat_interleave(rep, dim=2)  # noqa: E731
    keys, vals = torch.cat([ex(pk)[of_row], ex(k)], 1), torch.cat([ex(pv)[of_row], ex(v)], 1)
    seen = torch.cat([(torch.arange(Sp)[None] < plen[of_row][:, None])[:, None].expand(N, T, Sp),
                      torch.ones(T, T, dtype=torch.bool).tril()[None].expand(N, T, T)], 2)
    (t_dq, t_dk, t_dv), (b_dq, b_dk, b_dv) = TOL.attention_grad_errors(dtype, q, keys, vals, seen, grad_out, scale,
                                                                        p_unit)
    kv = lambda t: t.reshape(*t.shape[:2], Hkv, rep, D).sum(3)  # noqa: E731
    grp = lambda t: t.reshape(P, G, *t.shape[1:]).sum(1)  # noqa: E731
    # the gradients' rounding to the input dtype twice: the partial per query head (GQA) or per row (a prompt's G
    # rows, when gathered), then their sum
    uin, tiny = 2 * TOL.UNIT[dtype], TOL.TINY[dtype]
    return [t_dq + uin * b_dq + tiny, kv(t_dk[:, Sp:] + uin * b_dk[:, Sp:]) + tiny,
            kv(t_dv[:, Sp:] + uin * b_dv[:, Sp:]) + tiny, grp(kv(t_dk[:, :Sp] + uin * b_dk[:, :Sp])) + tiny,
            grp(kv(t_dv[:, :Sp] + uin * b_dv[:, :Sp])) + tiny]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_value_and_gradients_match_the_oracle(case, dtype, impl):
    q, k, v, pk, pv, plen, gout = make_inputs(*CASES[case], dtype=dtype)
    ins = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = K.shared_prefix_attention(*ins, plen, impl=impl)
    grads = torch.autograd.grad(out, ins, gout)
    want, want_grads = oracle_with_grads(q, k, v, pk, pv, plen, gout)
    D = q.shape[-1]
    # 16-bit: ATen's CPU flash kernel rounds the weights (and dS) to the input dtype before its GEMMs
    p_unit = 0.0 if dtype in (torch.float32, torch.float64) else TOL.UNIT[dtype]
    N, T, H, _ = q.shape
    P = pk.shape[0]
    _, lse, stats = O.decode_attention(q, k, v, torch.zeros(N, dtype=torch.long),
                                       (pk, pv, plen, torch.arange(P).repeat_interleave(N // P)))
    t_out, _ = TOL.attention_errors(dtype, want, lse, stats, p_unit)
    assert out.dtype == dtype and out.shape == q.shape
    TOL.assert_within(f"shared_prefix_attention {impl} {dtype} out", out, want, t_out)
    tols = tolerances(dtype, q, k, v, pk, pv, plen, gout, D ** -0.5, p_unit)
    for name, g, w, t in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, want_grads, tols):
        assert g.dtype == dtype and g.shape == w.shape
        TOL.assert_within(f"shared_prefix_attention {impl} {dtype} {name}", g, w, t)


def test_empty_prompts_get_no_gradient_and_rows_see_only_themselves():
    """A prompt of length 0: its rows equal plain causal attention, its slots get exactly zero gradient (ATen's
    kernel reports lse 0 for a query that sees no key; the merge must not weigh that part)."""
    q, k, v, pk, pv, plen, gout = make_inputs(*CASES["MHA, G=4"], dtype=torch.float32)
    plen = torch.tensor([0, 5])
    for impl in IMPLS:
        ins = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
        out = K.shared_prefix_attention(*ins, plen, impl=impl)
        plain = torch.nn.functional.scaled_dot_product_attention(q[:4].transpose(1, 2), k[:4].transpose(1, 2),
                                                                 v[:4].transpose(1, 2), is_causal=True)
        torch.testing.assert_close(out[:4], plain.transpose(1, 2), atol=2e-6, rtol=2e-6)
        g = torch.autograd.grad(out, ins, gout)
        assert torch.count_nonzero(g[3][0]) == 0 and torch.count_nonzero(g[4][0]) == 0
        assert torch.count_nonzero(g[3][1, 5:]) == 0 and torch.count_nonzero(g[3][1, :5]) > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(impl):
    q, k, v, pk, pv, plen, _ = make_inputs(2, 2, 3, 2, 1, 4, 3, torch.float64, seed=4)
    ins = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    assert torch.autograd.gradcheck(lambda *x: K.shared_prefix_attention(*x, plen, impl=impl, scale=0.7), ins)


def test_large_scores_and_a_custom_scale():
    q, k, v, pk, pv, plen, gout = make_inputs(*CASES["GQA 4:1, odd head dim"], dtype=torch.float32, spread=4.0, seed=3)
    ins = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out = K.shared_prefix_attention(*ins, plen.int(), scale=0.9)
    grads = torch.autograd.grad(out, ins, gout)
    want, want_grads = oracle_with_grads(q, k, v, pk, pv, plen, gout, scale=0.9)
    N, P = q.shape[0], pk.shape[0]
    _, lse, stats = O.decode_attention(q, k, v, torch.zeros(N, dtype=torch.long),
                                       (pk, pv, plen, torch.arange(P).repeat_interleave(N // P)), 0.9)
    assert float(lse.abs().max()) > 100
    TOL.assert_within("shared_prefix_attention large scores out", out, want,
                      TOL.attention_errors(torch.float32, want, lse, stats)[0])
    tols = tolerances(torch.float32, q, k, v, pk, pv, plen, gout, 0.9, 0.0)
    for name, g, w, t in zip(("dq", "dk", "dv", "dpk", "dpv"), grads, want_grads, tols):
        TOL.assert_within(f"shared_prefix_attention large scores {name}", g, w, t)


def test_argument_errors_name_the_argument():
    q, k, v, pk, pv, plen, _ = make_inputs(*CASES["MHA, G=4"], dtype=torch.float32)
    with pytest.raises(TypeError, match="q must have dtype"):
        K.shared_prefix_attention(q.long(), k, v, pk, pv, plen)
    with pytest.raises(TypeError, match="prefix_k must have dtype"):
        K.shared_prefix_attention(q, k, v, pk.double(), pv, plen)
    with pytest.raises(ValueError, match="k and v must both be"):
        K.shared_prefix_attention(q, k[:, :3], v, pk, pv, plen)
    with pytest.raises(ValueError, match=r"multiple of the prompts \(3\)"):
        K.shared_prefix_attention(q, k, v, torch.cat([pk, pk[:1]]), torch.cat([pv, pv[:1]]), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prefix_k and prefix_v must both be"):
        K.shared_prefix_attention(q, k, v, pk, pv[:, :, :2], plen)
    with pytest.raises(ValueError, match=r"prefix_lengths\[1\] = 10 is out of range"):
        K.shared_prefix_attention(q, k, v, pk, pv, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="impl must be one of"):
        K.shared_prefix_attention(q, k, v, pk, pv, plen, impl="flash")


def test_compiles_fullgraph_forward_and_backward():
    q, k, v, pk, pv, plen, gout = make_inputs(*CASES["GQA 4:1, odd head dim"], dtype=torch.float32)

    def loss(q, k, v, pk, pv):
        return (K.shared_prefix_attention(q, k, v, pk, pv, plen, check=False) * gout).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    ins = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ins2 = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    a, b = compiled(*ins), loss(*ins2)
    torch.testing.assert_close(a, b, atol=0, rtol=1e-5)  # inductor fuses the merge and the sum in its own order
    for x, y in zip(torch.autograd.grad(a, ins), torch.autograd.grad(b, ins2)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
