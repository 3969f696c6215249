"""decode_attention: every backend against the fp64 oracle (tests/oracle.py), with tolerances from error analysis
(tests/tolerance.py attention_errors); shared prefixes, GQA, Jacobi windows, odd shapes, extremes, errors, opcheck,
torch.compile, and the Triton launcher under the interpreter."""
from __future__ import annotations

import pytest
import torch

import mmr1_kernels as K
from mmr1_kernels import reference as ref
from mmr1_kernels._library import op

import oracle as O
import tolerance as TOL

# R rows, W window, H heads, Hkv kv heads, D head dim, S own slots, P prompts, Sp prefix slots
CASES = {
    "decode step, MHA": (6, 1, 4, 4, 32, 40, 2, 30),
    "GQA 4:1, odd head dim": (5, 3, 8, 2, 24, 20, 3, 17),
    "Jacobi window W=8 (queries as lanes)": (4, 8, 6, 6, 32, 50, 2, 45),
    "MQA, 16 queries per kv head": (3, 2, 8, 1, 64, 33, 1, 70),
    "head dim 128, GQA 2:1": (7, 5, 4, 2, 128, 70, 2, 33),
    "one slot, empty prefixes": (2, 1, 2, 2, 8, 1, 2, 0),
}


def make_inputs(R, W, H, Hkv, D, S, P, Sp, dtype, prefix=True, seed=0, spread=1.0):
    """Inputs in ``dtype`` (the oracle sees the same rounded values). Lengths cover 0 and S - W (the window ends at
    the last slot); prefix lengths 0 and Sp; some rows without a prefix (-1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * spread).to(dtype)  # noqa: E731
    q, k, v = rnd(R, W, H, D), rnd(R, S, Hkv, D), rnd(R, S, Hkv, D)
    lengths = torch.randint(0, S - W + 1, (R,), generator=g)
    lengths[0], lengths[-1] = 0, S - W
    kw = {}
    if prefix:
        plen = torch.randint(0, Sp + 1, (P,), generator=g)
        plen[-1] = Sp
        if P > 1:
            plen[0] = 0
        of_row = torch.randint(-1, P, (R,), generator=g)
        of_row[-1] = P - 1
        kw = dict(prefix_k=rnd(P, Sp, Hkv, D), prefix_v=rnd(P, Sp, Hkv, D), prefix_lengths=plen, prefix_of_row=of_row)
    return q, k, v, lengths, kw


def oracle(q, k, v, lengths, kw, scale=None):
    prefix = None if not kw else (kw["prefix_k"], kw["prefix_v"], kw["prefix_lengths"], kw["prefix_of_row"])
    return O.decode_attention(q, k, v, lengths, prefix, scale)


def check(name, out, lse, q, k, v, lengths, kw, dtype, p_unit=0.0, scale=None):
    want, want_lse, stats = oracle(q, k, v, lengths, kw, scale)
    t_out, t_lse = TOL.attention_errors(dtype, want, want_lse, stats, p_unit)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    TOL.assert_within(f"{name} out", out, want, t_out)
    TOL.assert_within(f"{name} lse", lse, want_lse, t_lse)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prefix", [True, False])
def test_cpp_kernel_matches_the_oracle(case, dtype, prefix):
    q, k, v, lengths, kw = make_inputs(*CASES[case], dtype=dtype, prefix=prefix)
    out, lse = K.decode_attention(q, k, v, lengths, return_lse=True, **kw)
    check(f"cpp decode_attention {dtype}", out, lse, q, k, v, lengths, kw, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_the_oracle(case, dtype):
    """The spec itself (also the fallback on devices without a kernel) against the independent oracle."""
    q, k, v, lengths, kw = make_inputs(*CASES[case], dtype=dtype)
    out, lse = ref.decode_attention(q, k, v, lengths, kw["prefix_k"], kw["prefix_v"], kw["prefix_lengths"],
                                    kw["prefix_of_row"], dtype=dtype)
    check(f"reference decode_attention {dtype}", out, lse, q, k, v, lengths, kw, dtype)


def test_large_scores_and_int32_indices():
    """Scores of +-100s (the max shift must hold), int32 lengths / ids, a custom scale."""
    q, k, v, lengths, kw = make_inputs(*CASES["GQA 4:1, odd head dim"], dtype=torch.float32, spread=4.0, seed=3)
    kw32 = {**kw, "prefix_lengths": kw["prefix_lengths"].int(), "prefix_of_row": kw["prefix_of_row"].int()}
    out, lse = K.decode_attention(q, k, v, lengths.int(), scale=0.9, return_lse=True, **kw32)
    assert float(lse.abs().max()) > 100
    check("cpp decode_attention large scores", out, lse, q, k, v, lengths, kw, torch.float32, scale=0.9)


def test_a_shared_prefix_equals_the_concatenation():
    """The claim behind the decoder's layout: a row pointing at a stored prompt attends exactly as a row whose own
    cache holds [prompt; own slots] -- for every position of a Jacobi window."""
    R, W, H, Hkv, D, S, Sp = 4, 4, 4, 2, 32, 30, 12
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(R, W, H, D, generator=g), torch.randn(R, S, Hkv, D, generator=g),
               torch.randn(R, S, Hkv, D, generator=g))
    pk, pv = torch.randn(2, Sp, Hkv, D, generator=g), torch.randn(2, Sp, Hkv, D, generator=g)
    plen, of_row = torch.tensor([12, 7]), torch.tensor([0, 1, 1, 0])
    lengths = torch.tensor([0, 5, 26, 13])
    out = K.decode_attention(q, k, v, lengths, prefix_k=pk, prefix_v=pv, prefix_lengths=plen, prefix_of_row=of_row)
    kc, vc = torch.zeros(R, Sp + S, Hkv, D), torch.zeros(R, Sp + S, Hkv, D)
    for r in range(R):
        n = int(plen[of_row[r]])
        kc[r, :n], vc[r, :n] = pk[of_row[r], :n], pv[of_row[r], :n]
        kc[r, n:n + S], vc[r, n:n + S] = k[r], v[r]
    cat = K.decode_attention(q, kc, vc, lengths + plen[of_row])
    torch.testing.assert_close(out, cat, atol=2e-6, rtol=2e-6)


def test_a_window_is_causal():
    """Window position w of a row sees exactly what a one-token step at lengths + w sees."""
    q, k, v, lengths, kw = make_inputs(*CASES["Jacobi window W=8 (queries as lanes)"], dtype=torch.float32)
    out = K.decode_attention(q, k, v, lengths, **kw)
    for w in range(q.shape[1]):
        one = K.decode_attention(q[:, w:w + 1].contiguous(), k, v, lengths + w, **kw)
        torch.testing.assert_close(out[:, w:w + 1], one, atol=1e-6, rtol=1e-6)


def test_rows_are_independent_and_nan_stays_in_its_row():
    q, k, v, lengths, kw = make_inputs(*CASES["decode step, MHA"], dtype=torch.float32, prefix=False)
    clean = K.decode_attention(q, k, v, lengths)
    k2 = k.clone()
    k2[2, 0, 1, 3] = float("nan")  # row 2, kv head 1, slot 0 (seen by every query of row 2)
    out = K.decode_attention(q, k2, v, lengths)
    assert torch.isnan(out[2, :, 1]).all() and not torch.isnan(out[2, :, 0]).any()
    keep = torch.ones(q.shape[0], dtype=torch.bool)
    keep[2] = False
    assert torch.equal(out[keep], clean[keep])


def test_a_query_with_no_key_gets_zero_and_minus_inf():
    q = torch.randn(2, 1, 2, 8)
    k = v = torch.zeros(2, 0, 2, 8)  # no own slot, and an empty prefix
    kw = dict(prefix_k=torch.randn(1, 4, 2, 8), prefix_v=torch.randn(1, 4, 2, 8), prefix_lengths=torch.tensor([0]),
              prefix_of_row=torch.tensor([0, -1]))
    out, lse = K.decode_attention(q, k, v, torch.zeros(2, dtype=torch.long), check=False, return_lse=True, **kw)
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())
    ro, rl = ref.decode_attention(q, k, v, torch.zeros(2, dtype=torch.long), kw["prefix_k"], kw["prefix_v"],
                                  kw["prefix_lengths"], kw["prefix_of_row"])
    assert torch.equal(ro, out) and torch.equal(rl, lse)


def test_out_of_range_values_are_clamped_without_check():
    """check=False never reads outside the tensors: a length past the cache reads the whole cache, a negative one
    none of it, an unknown prompt id means no prefix, a prefix length past the store reads the whole store."""
    q, k, v, lengths, kw = make_inputs(*CASES["GQA 4:1, odd head dim"], dtype=torch.float32)
    S, P, Sp = k.shape[1], kw["prefix_k"].shape[0], kw["prefix_k"].shape[1]
    bad_len = torch.tensor([10**6, -5, 3, S, 0])
    bad = {**kw, "prefix_of_row": torch.tensor([P + 7, -9, 0, 1, 2]), "prefix_lengths": torch.tensor([Sp + 50, -3, 5])}
    out, lse = K.decode_attention(q, k, v, bad_len, check=False, return_lse=True, **bad)
    fixed = {**kw, "prefix_of_row": torch.tensor([-1, -1, 0, 1, 2]), "prefix_lengths": torch.tensor([Sp, 0, 5])}
    check("cpp decode_attention clamped", out, lse, q, k, v, bad_len.clamp(min=0), fixed, torch.float32)


def test_argument_errors_name_the_argument():
    q, k, v, lengths, kw = make_inputs(*CASES["decode step, MHA"], dtype=torch.float32)
    with pytest.raises(TypeError, match="q must have dtype"):
        K.decode_attention(q.long(), k, v, lengths)
    with pytest.raises(TypeError, match="k must have dtype"):
        K.decode_attention(q, k.half(), v, lengths)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        K.decode_attention(q[0], k, v, lengths)
    with pytest.raises(ValueError, match="k and v must both be"):
        K.decode_attention(q, k, v[:, :5], lengths)
    with pytest.raises(ValueError, match="multiple of k's kv heads"):
        K.decode_attention(q[:, :, :3], k, v, lengths)
    with pytest.raises(ValueError, match="lengths must have shape"):
        K.decode_attention(q, k, v, lengths[:2])
    with pytest.raises(TypeError, match="lengths must have dtype"):
        K.decode_attention(q, k, v, lengths.float())
    with pytest.raises(ValueError, match=r"lengths\[0\] = 40 is out of range"):
        K.decode_attention(q, k, v, torch.full_like(lengths, 40))
    with pytest.raises(ValueError, match="must be given together"):
        K.decode_attention(q, k, v, lengths, prefix_k=kw["prefix_k"])
    with pytest.raises(ValueError, match="prefix_k and prefix_v must both be"):
        K.decode_attention(q, k, v, lengths, **{**kw, "prefix_v": kw["prefix_v"][:, :, :2]})
    with pytest.raises(ValueError, match=r"prefix_of_row\[1\] = 2 is out of range"):
        K.decode_attention(q, k, v, lengths, **{**kw, "prefix_of_row": torch.tensor([0, 2, 1, -1, 0, 1])})
    with pytest.raises(ValueError, match=r"prefix_lengths\[0\] = 31 is out of range"):
        K.decode_attention(q, k, v, lengths, **{**kw, "prefix_lengths": torch.tensor([31, 4])})
    with pytest.raises(ValueError, match="scale must be finite"):
        K.decode_attention(q, k, v, lengths, scale=float("nan"))


@pytest.mark.parametrize("prefix", [True, False])
def test_opcheck(prefix):
    q, k, v, lengths, kw = make_inputs(*CASES["GQA 4:1, odd head dim"], dtype=torch.float32, prefix=prefix)
    args = (q, k, v, lengths, kw.get("prefix_k"), kw.get("prefix_v"), kw.get("prefix_lengths"),
            kw.get("prefix_of_row"), 0.2)
    torch.library.opcheck(op("decode_attention"), args)


def test_compiles_fullgraph():
    q, k, v, lengths, kw = make_inputs(*CASES["Jacobi window W=8 (queries as lanes)"], dtype=torch.float32)

    def step(q, k, v, lengths, pk, pv, pl, po):
        return K.decode_attention(q, k, v, lengths, prefix_k=pk, prefix_v=pv, prefix_lengths=pl, prefix_of_row=po,
                                  check=False) * 2

    args = (q, k, v, lengths, kw["prefix_k"], kw["prefix_v"], kw["prefix_lengths"], kw["prefix_of_row"])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args), atol=0, rtol=0)


# --------------------------------------------------------------------------- Triton (interpreter without a GPU)

TRITON_CASES = {
    "decode step, MHA": CASES["decode step, MHA"],
    "GQA 4:1, odd head dim": CASES["GQA 4:1, odd head dim"],
    "Jacobi window W=8 (queries as lanes)": CASES["Jacobi window W=8 (queries as lanes)"],
    "window chunks (W x rep > a tile)": (3, 9, 8, 1, 16, 14, 2, 9),
    "key splits (flash-decoding merge)": (2, 1, 2, 2, 16, 300, 1, 290),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(TRITON_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_matches_the_oracle(triton_kernels, case, dtype):
    G = triton_kernels.attention
    q, k, v, lengths, kw = make_inputs(*TRITON_CASES[case], dtype=dtype)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    to = lambda t: t.to(dev)  # noqa: E731
    R, W, H, D = q.shape
    if case.startswith("key splits"):  # the shapes must make the launcher split both parts
        assert G._splits(k.shape[1], R * k.shape[2], G._sm_count(torch.device(dev))) > 1
    if case.startswith("window chunks"):
        assert W * (H // k.shape[2]) > G.max_queries(D, dtype == torch.float32)
    out, lse = G.decode_attention(to(q), to(k), to(v), to(lengths), to(kw["prefix_k"]), to(kw["prefix_v"]),
                                  to(kw["prefix_lengths"]), to(kw["prefix_of_row"]), D ** -0.5)
    # 16-bit: the kernel rounds the weights to the cache dtype before the p.V dot (as flash-attention does)
    p_unit = 0.0 if dtype == torch.float32 else TOL.UNIT[dtype]
    check(f"triton decode_attention {dtype}", out.cpu(), lse.cpu(), q, k, v, lengths, kw, dtype, p_unit)
