"""A source checkout without the compiled extension still imports, warns once, and computes correctly: the fallback
(mmr1_kernels.reference under CompositeExplicitAutograd, with its closed-form backward) is checked against the tests'
own fp64 oracle -- values and gradients -- not against itself."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import sys, warnings, torch
sys.path.insert(0, TESTS)
import oracle as O
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mmr1_kernels as K
msgs = [str(w.message) for w in caught if "C++ CPU kernels are not built" in str(w.message)]
assert len(msgs) == 1 and "pip install --no-build-isolation -e ." in msgs[0], msgs
assert not K.HAS_CPP and K.backend_for(torch.device("cpu")) == "reference"
g = torch.Generator().manual_seed(0)
B, T, V, lo, hi = 3, 4, 70, 5, 60
z = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
t = torch.randint(lo, hi, (B, T), generator=g)
mask = torch.rand(B, T, generator=g) > 0.2
base = O.logprobs(z, t, 0.9, lo, hi)
old = base + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
ref = base + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
old[0, 0] = base[0, 0] - 25  # beyond the log-ratio clamp
ref[1, 1] = base[1, 1] + 25  # beyond the KL clamp
mask[0, 0] = mask[1, 1] = True
adv = torch.randn(B, generator=g, dtype=torch.float64)
for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
    kw = dict(temperature=0.9, vocab_range=(lo, hi), epsilon=0.2, epsilon_high=0.28, beta=0.1, loss_type=loss_type)
    got, g_got = O.grad(lambda x: K.grpo_loss(x, t, adv, mask, old, ref, **kw)[0], z)
    want, g_want = O.grad(lambda x: O.grpo_loss(x, t, adv, mask, old, ref, **kw)[0], z)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-9)
# fp32 logits: fp32 math, against the oracle on the same rounded inputs
z32 = z.float()
lp = K.token_logprobs(z32, t, 0.9, (lo, hi), mask=mask)
torch.testing.assert_close(lp.double(), torch.where(mask, O.logprobs(z32, t, 0.9, lo, hi), 0.0), atol=2e-6, rtol=0)
x = z32.clone().requires_grad_(True)
K.token_logprobs(x, t, 0.9, (lo, hi), mask=mask).sum().backward()
_, want = O.grad(lambda y: torch.where(mask, O.logprobs(y, t, 0.9, lo, hi), 0.0).sum(), z32)
torch.testing.assert_close(x.grad.double(), want, atol=1e-6, rtol=1e-5)
tok, _ = K.cfg_sample(torch.randn(4, 50), seed=0, offset=0)
assert tok.shape == (4,)
print("ok")
"""


def test_import_without_extension_falls_back_to_reference_and_matches_the_oracle(tmp_path):
    pkg = tmp_path / "mmr1_kernels"
    shutil.copytree(ROOT / "mmr1_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMR1_REQUIRE_CPP", None)
    script = f"TESTS = {str(ROOT / 'tests')!r}\n" + SCRIPT
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_a_required_extension_that_is_missing_is_an_error(tmp_path):
    """MMR1_REQUIRE_CPP=1 (set by `make test` and CI) turns the warning into an ImportError naming the fix."""
    pkg = tmp_path / "mmr1_kernels"
    shutil.copytree(ROOT / "mmr1_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "MMR1_REQUIRE_CPP": "1"}
    out = subprocess.run([sys.executable, "-c", "import mmr1_kernels"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "MMR1_REQUIRE_CPP=1" in out.stderr and "make build" in out.stderr, out.stderr[-2000:]
