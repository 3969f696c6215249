"""A source checkout without the compiled extension still imports, warns once, and computes correctly."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mmr1_kernels as K
    from mmr1_kernels import reference as R
msgs = [str(w.message) for w in caught if "C++ CPU kernels are not built" in str(w.message)]
assert len(msgs) == 1 and "pip install --no-build-isolation -e ." in msgs[0], msgs
assert not K.HAS_CPP and K.backend_for(torch.device("cpu")) == "reference"
z = torch.randn(2, 3, 40); t = torch.randint(0, 40, (2, 3))
lp = K.token_logprobs(z, t)
torch.testing.assert_close(lp, R.token_logprobs(z, t)[0])
loss, _ = K.grpo_loss(z.requires_grad_(), t, torch.randn(2)); loss.backward()
tok, _ = K.cfg_sample(torch.randn(4, 50), seed=0, offset=0)
assert tok.shape == (4,)
print("ok")
"""


def test_import_without_extension_falls_back_to_reference(tmp_path):
    pkg = tmp_path / "mmr1_kernels"
    shutil.copytree(ROOT / "mmr1_kernels", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
