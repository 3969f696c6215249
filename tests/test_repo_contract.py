"""The repository is self-contained: every file path its code, docs and README cite exists, and every name a
module exports in __all__ resolves."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# a path of the repository as the text cites it: a top-level folder of the project, then a file with a suffix
CITED = re.compile(r"(?<![\w./-])((?:docs|mmr1|mmr1_kernels|csrc|bench|tests)/[\w./-]*\w\.(?:md|py|cpp|h|json|png|sh|txt|"
                   r"safetensors|csv))")
SOURCES = ["README.md", "BENCHMARKS.md", "Makefile", "setup.py", "CMakeLists.txt"] + [
    str(p.relative_to(ROOT)) for d in ("docs", "mmr1", "mmr1_kernels", "csrc", "bench", "tests")
    for p in (ROOT / d).rglob("*") if p.suffix in (".md", ".py", ".cpp", ".h", ".sh") and "data" not in p.parts]
OUTPUTS = {"bench/results/gpu.json"}  # written by `make gpu-check` on a GPU machine: cited as where it will be


def test_every_cited_path_exists():
    missing = []
    for src in SOURCES:
        text = (ROOT / src).read_text(errors="replace")
        for path in set(CITED.findall(text)):
            if "*" in path or "<" in path or path in OUTPUTS:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{src}: {path}")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(sorted(missing))


def test_nothing_points_outside_the_repository():
    outside = [src for src in SOURCES if re.search(r"\.\./shared|\.\./DESIGN|DESIGN\.md", (ROOT / src).read_text(
        errors="replace")) and src != "tests/test_repo_contract.py"]
    assert not outside, f"files that cite something outside the repository: {outside}"


def _modules():
    for pkg in ("mmr1_kernels", "mmr1"):
        mod = importlib.import_module(pkg)
        yield pkg
        for info in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}."):
            if info.name.endswith("__main__") or info.name.endswith("._C"):  # _C: the compiled library, no Python
                continue
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_exported_name_resolves(name):
    mod = importlib.import_module(name)
    for export in getattr(mod, "__all__", []):
        assert hasattr(mod, export), f"{name}.__all__ names {export!r}, which the module does not define"


def test_every_public_op_is_exported():
    import mmr1_kernels

    for op in ("token_logprobs", "grpo_loss", "fused_linear_logprobs", "fused_linear_grpo_loss", "policy_loss",
               "group_advantages", "cfg_sample", "decode_attention", "shared_prefix_attention"):
        assert op in mmr1_kernels.__all__ and callable(getattr(mmr1_kernels, op))


def test_markdown_links_resolve():
    """Relative links of every Markdown file (README, BENCHMARKS, docs/) lead to a file of the repository."""
    broken = []
    for md in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not (md.parent / target.split("#")[0]).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_planted_bug_still_matches_its_source_once():
    """tests/mutants.py pins each mutant to a text of the source: a move or a rewrite that breaks the pin must be
    seen here, in make test, not only in the next make mutants (one went stale unseen once)."""
    import mutants

    stale = [(m.name, m.file, (ROOT / m.file).read_text().count(m.find)) for m in mutants.MUTANTS
             if (ROOT / m.file).read_text().count(m.find) != 1]
    assert not stale, stale
