"""cfg_sample: distribution, RNG equality across backends, batch invariance, semantics vs transformers, errors."""
from __future__ import annotations

import pytest
import torch

from mmr1_kernels import reference_sampler as R
from mmr1_kernels._library import op
from mmr1_kernels.sampler import cfg_sample

from conftest import triton_device


def _params(B, cfg=1.0, temp=1.0, k=0, p=1.0, device="cpu"):
    f = lambda v, dt: v.to(device) if isinstance(v, torch.Tensor) else torch.full((B,), v, dtype=dt, device=device)  # noqa
    return f(cfg, torch.float32), f(temp, torch.float32), f(k, torch.int64), f(p, torch.float32)


def run_backend(backend, cond, uncond, cfg, temp, k, p, forced, seed, offset, row_ids, lo, hi, want_cond=False):
    if backend == "cpp":
        return op("cfg_sample")(cond, uncond, cfg, temp, k, p, forced, torch.tensor(seed), torch.as_tensor(offset),
                                row_ids, lo, hi, want_cond)
    if backend == "reference":
        return R.cfg_sample(cond, uncond, cfg, temp, k, p, forced, seed, offset, row_ids, lo, hi, want_cond)
    from mmr1_kernels.gpu import sampler as G

    dev = triton_device()
    mv = lambda t: None if t is None else t.to(dev)  # noqa: E731
    outs = G.cfg_sample(mv(cond), mv(uncond), mv(cfg), mv(temp), mv(k), mv(p), mv(forced),
                        torch.tensor(seed, device=dev), torch.as_tensor(offset).to(dev), mv(row_ids), lo, hi,
                        want_cond)
    return tuple(t.cpu() for t in outs)


# --------------------------------------------------------------------------- RNG


def test_philox_known_answers_and_uniform_range():
    z = torch.zeros(1, dtype=torch.long)
    assert [int(v) for v in R.philox4x32(z, z, z, z, 0, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF)
    assert [int(v) for v in R.philox4x32(f, f, f, f, 0xFFFFFFFF, 0xFFFFFFFF)] == \
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    u = R.uniforms(123, 7, torch.arange(4), torch.arange(1000), torch.float64)
    assert 0 < u.min() and u.max() < 1 and abs(float(u.mean()) - 0.5) < 0.02


# --------------------------------------------------------------------------- distribution


def _chi2_pvalue(counts, probs):
    n = counts.sum()
    keep = probs > 0
    assert torch.all(counts[~keep] == 0), "sampled a token outside the kept set"
    expected = probs[keep] * n
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), stat / 2.0)) if dof > 0 else 1.0


DIST_CASES = [
    # name, V, window, cfg on, temperature, top_k, top_p
    ("plain", 12, None, False, 1.0, 0, 1.0),
    ("cfg", 12, None, True, 1.0, 0, 1.0),
    ("cfg_T0.5_topk4", 16, (3, 13), True, 0.5, 4, 1.0),
    ("T2_topp0.8", 10, None, False, 2.0, 0, 0.8),
    ("cfg_topk6_topp0.7_window", 20, (5, 17), True, 1.3, 6, 0.7),
]


# Triton runs the cases without top-k / top-p here: the interpreter's top-k / top-p path costs 30-90 s per case, and
# test_triton_matches_cpp_tokens shows the Triton kernel draws the C++ kernel's exact tokens with per-row top-k,
# top-p, CFG, temperatures and a window -- so the C++ kernel's distribution tests below cover Triton's too.
DIST_PARAMS = [pytest.param(b, *c, id=f"{c[0]}-{b}") for c in DIST_CASES for b in ("cpp", "reference", "triton")
               if b != "triton" or (c[5] == 0 and c[6] == 1.0)]


@pytest.mark.parametrize("backend,name,V,window,use_cfg,temp,k,p", DIST_PARAMS)
def test_empirical_distribution_matches_kept_softmax(request, backend, name, V, window, use_cfg, temp, k, p):
    if backend == "triton":
        request.getfixturevalue("triton_kernels")
    lo, hi = window or (0, V)
    g = torch.Generator().manual_seed(1)
    base_c = torch.randn(V, generator=g) * 1.5
    base_u = torch.randn(V, generator=g)
    B = 60 if backend == "triton" else 2000  # the interpreter runs one program at a time in Python
    rounds = 5 if backend == "triton" else 10
    cond = base_c.expand(B, V).contiguous()
    uncond = base_u.expand(B, V).contiguous() if use_cfg else None
    cfg, T, kk, pp = _params(B, 3.0 if use_cfg else 1.0, temp, k, p)
    probs = R.sampling_distribution(cond[:1], None if uncond is None else uncond[:1], cfg[:1], T[:1], kk[:1], pp[:1],
                                    lo, hi)[0]
    counts = torch.zeros(hi - lo, dtype=torch.float64)
    for step in range(rounds):
        tok, logp, *_ = run_backend(backend, cond, uncond, cfg, T, kk, pp, None, 99, step, torch.arange(B), lo, hi)
        assert torch.all((tok >= lo) & (tok < hi))
        counts += torch.bincount(tok - lo, minlength=hi - lo).double()
        torch.testing.assert_close(logp.double(), probs.log()[tok - lo], atol=2e-5, rtol=2e-5)
    assert _chi2_pvalue(counts, probs) > 1e-4
    tv = 0.5 * (counts / counts.sum() - probs).abs().sum()
    assert tv < 1.5 * (len(probs) / counts.sum()) ** 0.5  # E[TV] ~ 0.4 sqrt(K / n)


def test_per_row_parameters_use_their_own_distribution():
    B, V = 6, 30
    g = torch.Generator().manual_seed(2)
    cond = torch.randn(B, V, generator=g) * 2
    uncond = torch.randn(B, V, generator=g)
    cfg = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 1.0])
    T = torch.tensor([1.0, 0.7, 1.5, 1.0, 1.0, 0.3])
    k = torch.tensor([0, 5, 0, 3, 10, 0])
    p = torch.tensor([1.0, 1.0, 0.6, 1.0, 0.9, 0.5])
    probs = R.sampling_distribution(cond, uncond, cfg, T, k, p, 0, V)
    reps = 600
    idx = torch.arange(B).repeat(reps)
    counts = torch.zeros(B, V, dtype=torch.float64)
    for step in range(4):
        tok, _ = cfg_sample(cond[idx], uncond[idx], cfg_scale=cfg[idx], temperature=T[idx], top_k=k[idx],
                            top_p=p[idx], seed=5, offset=step, row_ids=torch.arange(B * reps))
        counts.index_put_((idx, tok), torch.ones(len(tok), dtype=torch.float64), accumulate=True)
    for r in range(B):
        assert _chi2_pvalue(counts[r], probs[r]) > 1e-4, r


# --------------------------------------------------------------------------- equality across backends


def _random_batch(B=48, V=3000, window=(4, 2052), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = (torch.randn(B, V, generator=g) * 3).to(dtype)
    uncond = (torch.randn(B, V, generator=g) * 2).to(dtype)
    cfg = torch.rand(B, generator=g) * 4
    T = torch.rand(B, generator=g) * 1.5 + 0.2
    T[::7] = 0.0  # some greedy rows
    k = torch.randint(0, 400, (B,), generator=g)
    p = torch.where(torch.rand(B, generator=g) < 0.5, torch.ones(B), torch.rand(B, generator=g) * 0.8 + 0.1)
    forced = torch.full((B,), -1, dtype=torch.long)
    forced[::5] = 8803  # a structure token outside the window
    return cond, uncond, cfg, T, k, p, forced, window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_matches_reference_tokens_and_logprobs(dtype):
    cond, uncond, cfg, T, k, p, forced, (lo, hi) = _random_batch(dtype=dtype, V=9000)
    rows = torch.arange(100, 100 + cond.shape[0])
    a = run_backend("cpp", cond, uncond, cfg, T, k, p, forced, 2024, 17, rows, lo, hi, True)
    b = run_backend("reference", cond, uncond, cfg, T, k, p, forced, 2024, 17, rows, lo, hi, True)
    assert torch.equal(a[3], b[3]) and torch.all(a[3] == 0)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[2], b[2], atol=1e-4, rtol=1e-4)
    assert torch.all(a[0][::5] == 8803) and torch.all(a[1][::5] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_cpp_tokens(triton_kernels, dtype):
    cond, uncond, cfg, T, k, p, forced, (lo, hi) = _random_batch(B=24, V=2500, window=(3, 2001), dtype=dtype)
    a = run_backend("cpp", cond, uncond, cfg, T, k, p, forced, 7, 3, torch.arange(24), lo, hi, True)
    b = run_backend("triton", cond, uncond, cfg, T, k, p, forced, 7, 3, torch.arange(24), lo, hi, True)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[2], b[2], atol=1e-4, rtol=1e-4)
    assert torch.equal(a[3], b[3])


def test_batch_invariance_and_offsets_are_independent():
    cond, uncond, cfg, T, k, p, _, (lo, hi) = _random_batch(B=64)
    rows = torch.arange(64) * 3 + 11
    kw = dict(vocab_range=(lo, hi), seed=42, offset=9)
    full, _ = cfg_sample(cond, uncond, cfg_scale=cfg, temperature=T, top_k=k, top_p=p, row_ids=rows, **kw)
    for r in (0, 13, 63):
        one, _ = cfg_sample(cond[r:r + 1], uncond[r:r + 1], cfg_scale=cfg[r:r + 1], temperature=T[r:r + 1],
                            top_k=k[r:r + 1], top_p=p[r:r + 1], row_ids=rows[r:r + 1], **kw)
        assert one.item() == full[r].item()
    # uniform logits: draws at successive offsets agree only by chance (1/W)
    flat = torch.zeros(256, 4000)
    draws = torch.stack([cfg_sample(flat, seed=1, offset=o)[0] for o in range(6)])
    same = (draws[1:] == draws[:-1]).float().mean().item()
    assert same < 0.01
    assert draws.unique().numel() > 1000


# per-row offsets, including 64-bit patterns with the high word set and "negative" ones
ROW_OFFSETS = [0, 1, 5, 2**32 + 7, -3, 2**40, 17, 9]


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_per_row_offsets_draw_what_per_row_calls_draw(request, backend):
    """offset=[B] (a Jacobi window: each row at its own position) == one call per row with that row's offset."""
    if backend == "triton":
        request.getfixturevalue("triton_kernels")
    B = len(ROW_OFFSETS)
    cond, uncond, cfg, T, k, p, forced, (lo, hi) = _random_batch(B=B, V=1500, window=(3, 1200))
    rows = torch.tensor([4, 4, 4, 9, 9, 1, 0, 2])  # rows of one sequence share a row id, as in a window
    offs = torch.tensor(ROW_OFFSETS)
    got = run_backend(backend, cond, uncond, cfg, T, k, p, forced, 99, offs, rows, lo, hi, True)
    for r, o in enumerate(ROW_OFFSETS):
        sl = slice(r, r + 1)
        one = run_backend("reference", cond[sl], uncond[sl], cfg[sl], T[sl], k[sl], p[sl], forced[sl], 99, o,
                          rows[sl], lo, hi, True)
        assert got[0][r] == one[0][0], (r, o)
        torch.testing.assert_close(got[1][r:r + 1], one[1], atol=1e-4, rtol=1e-4)
    # and the offsets matter: the same rows at one shared offset draw differently (uniform logits: 1/W chance)
    flat = torch.zeros(B, 4000)
    per_row = cfg_sample(flat, seed=3, offset=offs, row_ids=torch.zeros(B, dtype=torch.long))[0]
    shared = cfg_sample(flat, seed=3, offset=0, row_ids=torch.zeros(B, dtype=torch.long))[0]
    assert (per_row == shared).sum() == 1  # only row 0, whose offset is 0
    assert per_row.unique().numel() == B


def test_per_row_offsets_public_api_and_errors():
    cond = torch.randn(3, 50)
    a = cfg_sample(cond, seed=1, offset=torch.tensor([4, 4, 4]))[0]
    b = cfg_sample(cond, seed=1, offset=4)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="offset must have shape"):
        cfg_sample(cond, seed=1, offset=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="offset must be an int or an int64 tensor"):
        cfg_sample(cond, seed=1, offset=torch.tensor([1.0, 2.0, 3.0]))


# --------------------------------------------------------------------------- semantics


def test_matches_transformers_logits_processors():
    from transformers.generation.logits_process import (ClassifierFreeGuidanceLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    B, V, lo, hi = 8, 500, 20, 420
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(B, V, generator=g, dtype=torch.float64) * 2
    uncond = torch.randn(B, V, generator=g, dtype=torch.float64)
    for scale, temp, k, p in [(3.0, 1.0, 50, 1.0), (4.0, 0.7, 0, 0.9), (1.5, 1.3, 100, 0.8), (1.01, 1.0, 0, 1.0)]:
        scores = torch.cat([cond[:, lo:hi], uncond[:, lo:hi]])
        ids = torch.zeros(B, 1, dtype=torch.long)
        s = ClassifierFreeGuidanceLogitsProcessor(scale)(torch.zeros(B, 1, dtype=torch.long), scores)
        s = TemperatureLogitsWarper(temp)(ids, s)
        if k:
            s = TopKLogitsWarper(k)(ids, s)
        if p < 1:
            s = TopPLogitsWarper(p)(ids, s)
        hf = torch.softmax(s, dim=-1)
        ours = R.sampling_distribution(cond, uncond, *_params(B, scale, temp, k, p), lo, hi)
        assert torch.equal(hf > 0, ours > 0), (scale, temp, k, p)
        torch.testing.assert_close(ours, hf, atol=1e-9, rtol=1e-6)  # transformers rounds through fp32 in places


def test_greedy_forced_and_cond_logprobs():
    cond = torch.tensor([[0.0, 5.0, 5.0, 1.0], [2.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    uncond = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    tok, lp, clp = cfg_sample(cond, uncond, cfg_scale=2.0, temperature=0.0, seed=0, offset=0,
                              forced=torch.tensor([-1, -1, 3]), return_cond_logprobs=True)
    # row 0: guided = 2c: tie between ids 1 and 2 -> lowest id; row 1: guided = 2c - u -> [4, 2, 0, -3] -> 0
    assert tok.tolist() == [1, 0, 3] and lp.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(clp[:2], torch.log_softmax(cond[:2], 1)[[0, 1], [1, 0]])
    assert clp[2] == 0.0


def test_out_argument_writes_into_a_column():
    seq = torch.zeros(5, 10, dtype=torch.long)
    cond = torch.randn(5, 100)
    tok, _ = cfg_sample(cond, seed=3, offset=0, out=seq[:, 4])
    assert tok.data_ptr() == seq[:, 4].data_ptr() and torch.equal(seq[:, 4], tok)


def test_nan_and_empty_rows():
    cond = torch.randn(3, 50)
    cond[1, 7] = float("nan")
    with pytest.raises(ValueError, match="row 1: NaN"):
        cfg_sample(cond, seed=0, offset=0)
    tok, lp = cfg_sample(cond, seed=0, offset=0, check=False, vocab_range=(5, 40))
    assert tok[1] == 5 and torch.isnan(lp[1]) and torch.isfinite(lp[[0, 2]]).all()
    empty = torch.full((2, 50), float("-inf"))
    with pytest.raises(ValueError, match="empty kept set"):
        cfg_sample(empty, seed=0, offset=0)
    tok, _ = cfg_sample(empty, seed=0, offset=0, check=False, vocab_range=(10, 20))
    assert torch.all(tok == 10)


def test_opcheck_and_compile():
    B, V = 4, 64
    cond, uncond = torch.randn(B, V), torch.randn(B, V)
    cfg, T, k, p = _params(B, 2.0, 1.0, 8, 0.9)
    args = (cond, uncond, cfg, T, k, p, torch.tensor([-1, 3, -1, -1]), torch.tensor(1), torch.tensor(2),
            torch.arange(B), 4, 60, True)
    torch.library.opcheck(op("cfg_sample"), args, test_utils=("test_schema", "test_faketensor"))
    per_row = args[:8] + (torch.tensor([2, 3, 4, 2**33]),) + args[9:]
    torch.library.opcheck(op("cfg_sample"), per_row, test_utils=("test_schema", "test_faketensor"))

    def step(c, u, off):
        return cfg_sample(c, u, cfg_scale=3.0, top_k=8, seed=11, offset=off, vocab_range=(4, 60), check=False)

    off = torch.tensor(5)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(cond, uncond, off),
                               step(cond, uncond, off))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(cond=torch.randn(2, 10).long()), TypeError, "cond must have dtype"),
    (dict(cond=torch.randn(10)), ValueError, "cond must have 2 dims"),
    (dict(uncond=torch.randn(3, 10)), ValueError, "uncond must have shape"),
    (dict(uncond=torch.randn(2, 10).half()), TypeError, "uncond must have dtype"),
    (dict(top_p=0.0), ValueError, "top_p must be > 0"),
    (dict(top_p=1.5), ValueError, "top_p must be <= 1"),
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(temperature=torch.tensor([1.0, float("nan")])), ValueError, r"temperature\[1\]"),
    (dict(top_k=-2), ValueError, "top_k must be >= 0"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"),
    (dict(cfg_scale=float("inf")), ValueError, "cfg_scale must be finite"),
    (dict(forced=torch.tensor([0, 10])), ValueError, "forced must be -1"),
    (dict(forced=torch.tensor([0])), ValueError, "forced must have shape"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(offset=2**64), ValueError, "offset must fit in 64 bits"),
    (dict(vocab_range=(3, 30)), ValueError, "vocab_range"),
    (dict(row_ids=torch.arange(3)), ValueError, "row_ids must have shape"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(cond=torch.randn(2, 10), seed=0, offset=0)
    args.update(kwargs)
    cond = args.pop("cond")
    with pytest.raises(exc, match=match):
        cfg_sample(cond, **args)
