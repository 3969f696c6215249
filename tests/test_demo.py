"""The demo pipeline end to end at toy settings, and the CLI's generate command on its output."""
import json

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.mark.slow
def test_demo_pipeline_and_cli_generate(tmp_path):
    from mmr1.cli import main as cli
    from mmr1.world import SIZE, Scene, Subject, render
    from mmr1.world.demo import DemoConfig, run

    out = tmp_path / "demo"
    # the pipeline's plumbing on a model trained from scratch: a small one (the shipped one is run below), 2 prompts
    # x G=4 per GRPO step
    summary = run(DemoConfig(out_dir=str(out), hidden=64, layers=2, heads=4, sft_steps=20, grpo_steps=3,
                             prompts_per_step=2, eval_prompts=6, eval_pair_prompts=4, sft_batch=4, compare_steps=1,
                             use_shipped=False, grpo_eval_prompts=3))
    assert set(summary["before"]) == {"one subject", "two subjects"}
    for split in summary["before"].values():
        for k in ("format", "layout", "text/whole", "subject_image/whole", "final/whole", "final/shape", "text/color"):
            mean, half = split[k]
            assert 0.0 <= mean <= 1.0 and half >= 0.0
    for name in ("grid.png", "reward_curve.png", "log.jsonl", "grpo.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (out / "grpo.jsonl").read_text().splitlines()]
    steps = [m for m in records if m.get("phase") != "eval"]
    assert len(steps) == 3 and all("reward/self" in m and "identity/whole_frac" in m for m in steps)
    # the held-out monitor: before the first step and after the last (grpo_eval_every=8 > 3 steps)
    evals = [m for m in records if m.get("phase") == "eval"]
    assert [m["step"] for m in evals] == [0, 3]
    assert all(0.0 <= m["held_out/two_subjects/final_whole"] <= 1.0 for m in evals)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["rollout_tok_s"] > 0
    speed = saved["fused_vs_reference"]
    assert speed["kernels"]["same_tokens_as_reference"] == 1.0  # both paths drew the same rollouts
    assert speed["reference"]["train_tok_s"] > 0 and speed["kernels"]["rollout_tok_s"] > 0
    ref = tmp_path / "ref.png"
    Image.fromarray(render(Scene(Subject("circle", "red", "stripes", "blue"), "sky", "left", "big")).numpy()).save(ref)
    cli(["generate", "--run", str(out), "--prompt", "my subject small at the right on sand", "--reference", str(ref),
         "--out", str(tmp_path / "x.png")])
    img = np.asarray(Image.open(tmp_path / "x.png"))
    assert img.shape == (SIZE * 4, SIZE * 4 * 3, 3)
    two = "my first subject at the left and my second subject at the right on sky"
    cli(["generate", "--run", str(out), "--prompt", two, "--reference", str(ref), "--reference", str(ref),
         "--out", str(tmp_path / "y.png")])
    assert np.asarray(Image.open(tmp_path / "y.png")).shape == (SIZE * 4, SIZE * 4 * 4, 3)
    with pytest.raises(SystemExit, match="give --reference 2"):
        cli(["generate", "--run", str(out), "--prompt", two, "--reference", str(ref)])
    with pytest.raises(SystemExit, match="outside the world's vocabulary"):
        cli(["generate", "--run", str(out), "--prompt", "my subject on mars", "--reference", str(ref)])
    with pytest.raises(SystemExit, match="not found"):
        cli(["generate", "--run", str(tmp_path / "nope"), "--prompt", "x", "--reference", str(ref)])


def test_shipped_cold_start_matches_this_code_and_reads_held_out_references():
    """The shipped world + weights were made by this code's default config; on held-out subjects (never seen in
    training) the model writes valid X-CoT and its reasoning names the whole subject at the target rate (>= 90%
    of one-subject prompts), and its final image shows it (>= 75%)."""
    from mmr1.world import build_tokenizer, load_world
    from mmr1.world.demo import DemoConfig, cold_start_key, shipped_cold_start
    from mmr1.world.identity import IdentityJudge
    from mmr1.world.tasks import evaluate, make_prompts, split_subjects, xcot_format
    from mmr1.model import load_transformer

    root = shipped_cold_start(DemoConfig())
    assert root is not None, "mmr1/assets/demo is missing or stale: run `make cold-start`"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"] == json.loads(json.dumps(cold_start_key(DemoConfig())))
    world = load_world(root / "world")
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the shipped tokenizer is the one this code builds
        text, _ = build_tokenizer(f"{d}/tokenizer.json", world.vq.num_codes)
        assert text.tok.get_vocab() == world.text.tok.get_vocab()
    model = load_transformer(root / "cold_start")
    assert model.config.vocab_size == world.text.vocab_size
    _, held_out = split_subjects(0, DemoConfig.held_out_frac)
    prompts = make_prompts(world, held_out, 64, seed=5) + make_prompts(world, held_out, 16, seed=6, pair_frac=1.0)
    table, _, _ = evaluate(model, world, IdentityJudge(world.vq), xcot_format(world), prompts, seed=1,
                           sampling=DemoConfig().sampling)
    one = table["one subject"]
    assert one["format"][0] == 1.0 and table["two subjects"]["format"][0] == 1.0
    assert one["text/whole"][0] >= 0.9, one["text/whole"]
    assert one["final/whole"][0] >= 0.75, one["final/whole"]
    assert shipped_cold_start(DemoConfig(hidden=64)) is None  # another config never loads these weights


@pytest.mark.slow
def test_demo_on_the_shipped_cold_start(tmp_path, capsys):
    from mmr1.world.demo import DemoConfig, run

    summary = run(DemoConfig(out_dir=str(tmp_path), grpo_steps=2, prompts_per_step=2, eval_prompts=8,
                             eval_pair_prompts=4, compare_steps=1, grpo_eval_prompts=2))
    printed = capsys.readouterr().out
    assert "cold start: shipped weights" in printed
    assert "reasoning names the subject(s)" in printed and "final image shows them" in printed
    assert summary["before"]["one subject"]["format"][0] == 1.0
    assert not (tmp_path / "cold_start").exists()  # nothing was trained


@pytest.mark.slow
def test_dreambench_eval_on_the_shared_benchmark(tmp_path):
    """mmr1 eval over the real (downscaled) DreamBench photos with tiny random CLIP / ViT models."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import ViTConfig, ViTModel

    from mmr1.cli import main as cli
    from mmr1.dreambench import load_benchmark, prompt_for
    from test_trainer import _tiny_clip

    root = Path(__file__).resolve().parent / "data" / "dreambench"
    subjects, p_obj, p_live = load_benchmark(root)
    assert len(subjects) == 30 and len(p_obj) == len(p_live) == 25
    assert subjects["dog"]["live"] and not subjects["can"]["live"]
    assert prompt_for(subjects["dog"], p_obj, p_live, 10) == "a sks dog wearing a red hat"
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4)).save_pretrained(tmp_path / "dino")
    clip = _tiny_clip(tmp_path)
    gen = tmp_path / "gen"
    for name in ("dog", "can"):
        (gen / name).mkdir(parents=True)
        shutil.copy(subjects[name]["images"][0], gen / name / "0_a.jpg")
        shutil.copy(subjects[name]["images"][1], gen / name / "20_b.jpg")
    out = tmp_path / "res.json"
    cli(["eval", "--dreambench", str(root), "--generated", str(gen), "--clip", str(clip), "--dino",
         str(tmp_path / "dino"), "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["images"] == 4 and set(res["per_subject"]) == {"dog", "can"}
    for v in res["summary"].values():
        assert -1.0 <= v <= 1.0
    (gen / "not_a_subject").mkdir()
    with pytest.raises(SystemExit, match="does not name a DreamBench subject"):
        cli(["eval", "--dreambench", str(root), "--generated", str(gen), "--clip", str(clip), "--dino",
             str(tmp_path / "dino")])


@pytest.mark.slow
def test_cli_sft_then_grpo(tmp_path):
    from mmr1.cli import main as cli

    cli(["sft", "--out-dir", str(tmp_path / "sft"), "--steps", "3"])
    assert (tmp_path / "sft" / "cold_start" / "model.safetensors").exists()
    cli(["grpo", "--cold-start", str(tmp_path / "sft" / "cold_start"), "--out-dir", str(tmp_path / "grpo"),
         "--steps", "2", "--eval-prompts", "4", "--eval-pair-prompts", "2", "--monitor-prompts", "2",
         "--compare-steps", "0"])
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["counts"] == {"one subject": 4, "two subjects": 2}
    records = [json.loads(line) for line in (tmp_path / "grpo" / "grpo.jsonl").read_text().splitlines()]
    assert [m.get("phase", "train") for m in records].count("train") == 2
    assert [m["step"] for m in records if m.get("phase") == "eval"] == [0, 2]
    with pytest.raises(SystemExit, match="no model at"):
        cli(["grpo", "--cold-start", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--eval-prompts must be >= 0"):
        cli(["grpo", "--cold-start", str(tmp_path / "sft" / "cold_start"), "--eval-prompts", "-1"])


def test_jacobi_rollouts_on_the_shipped_model_are_the_sequential_ones():
    """On the trained demo model (fp32), X-CoT rollouts decoded by Jacobi windows equal the sequential ones: every
    token and sequence of 24 rollouts (two 7x7 image blocks each), log-probs to fp32 rounding; a mismatch would
    be reported with its position and both draws' log-probs (only an fp near-tie may explain one), and the
    windows must save forwards (the acceptance, not only the equality)."""
    import mmr1.generate as G
    from mmr1.generate import SamplingConfig
    from mmr1.model import load_transformer
    from mmr1.rollout import xcot_rollout
    from mmr1.world import load_world
    from mmr1.world.demo import DemoConfig, shipped_cold_start
    from mmr1.world.tasks import make_prompts, split_subjects, xcot_format

    root = shipped_cold_start(DemoConfig())
    world, model = load_world(root / "world"), load_transformer(root / "cold_start")
    fmt = xcot_format(world)
    train, _ = split_subjects(0, DemoConfig.held_out_frac)
    ids = [p["prompt_ids"] for p in make_prompts(world, train, 6, seed=9, pair_frac=0.5)]
    kw = dict(cfg_scale=2.0, top_k=0, text_top_k=0, seed=17)
    seq = xcot_rollout(model, ids, world.image, fmt, SamplingConfig(**kw), num_samples=4)
    forwards = []
    orig = G.sample_image_blocks_jacobi
    G.sample_image_blocks_jacobi = lambda *a, **k: forwards.append(orig(*a, **k)) or forwards[-1]
    try:  # sample_image_blocks looks the name up in mmr1.generate at call time
        jac = xcot_rollout(model, ids, world.image, fmt, SamplingConfig(decode="jacobi", jacobi_window=8, **kw),
                           num_samples=4)
    finally:
        G.sample_image_blocks_jacobi = orig
    diff = (jac.tokens != seq.tokens).nonzero().tolist()
    detail = [(r, t, int(seq.tokens[r, t]), int(jac.tokens[r, t]), float(seq.logprobs[r, t]),
               float(jac.logprobs[r, t])) for r, t in diff[:5]]
    assert not diff, f"(row, position, sequential token, jacobi token, their log-probs): {detail}"
    torch.testing.assert_close(jac.logprobs, seq.logprobs, atol=5e-5, rtol=5e-5)
    L = world.image.block_length(*fmt.final_hw)
    assert len(forwards) == 2 and all(b.forwards <= 0.6 * (L - 1) for b in forwards), [b.forwards for b in forwards]


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["sequential", "jacobi"])
def test_shared_prefix_rollouts_on_the_shipped_model_draw_the_previous_tokens(decode):
    """A GRPO batch on the shipped model -- 4 prompts (one- and two-reference) x G = 4, CFG 2 and no CFG --
    through the decode layout (one copy of each prompt; mmr1_kernels.decode_attention) draws, token for token, what
    the previous path (prompts copied per row, masked SDPA) draws, with log-probs equal to fp32 rounding."""
    from mmr1.generate import SamplingConfig
    from mmr1.model import load_transformer
    from mmr1.rollout import xcot_rollout
    from mmr1.world import load_world
    from mmr1.world.demo import DemoConfig, shipped_cold_start
    from mmr1.world.tasks import make_prompts, split_subjects, xcot_format

    root = shipped_cold_start(DemoConfig())
    assert root is not None, "mmr1/assets/demo is missing or stale: run `make cold-start`"
    world, model = load_world(root / "world"), load_transformer(root / "cold_start")
    train, _ = split_subjects(0, DemoConfig.held_out_frac)
    prompts = [p["prompt_ids"] for p in make_prompts(world, train, 4, seed=3, pair_frac=0.5)]
    assert len({len(p) for p in prompts}) == 2  # one- and two-reference prompts
    for cfg_scale in (2.0, 1.0):
        ros = {att: xcot_rollout(model, prompts, world.image, xcot_format(world), SamplingConfig(
            cfg_scale=cfg_scale, top_k=0, text_top_k=0, seed=17, decode=decode, jacobi_window=8, attention=att),
            num_samples=4) for att in ("sdpa", "shared_prefix")}
        a, b = ros["sdpa"], ros["shared_prefix"]
        assert torch.equal(a.tokens, b.tokens), f"cfg {cfg_scale}: {int((a.tokens != b.tokens).sum())} tokens differ"
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=5e-5, rtol=5e-5)


def test_demo_command_line_reaches_the_config(monkeypatch):
    import mmr1.world.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda cfg, cold_start=None: seen.update(cfg=cfg, cold_start=cold_start))
    demo.main(["--no-dynamic-sampling", "--beta", "0.1", "--eval-every", "0", "--grpo-steps", "80"])
    cfg = seen["cfg"]
    assert (cfg.dynamic_sampling, cfg.grpo_beta, cfg.grpo_eval_every, cfg.grpo_steps) == (False, 0.1, 0, 80)
    demo.main([])
    cfg = seen["cfg"]
    assert (cfg.dynamic_sampling, cfg.grpo_beta, cfg.grpo_eval_every) == (True, demo.DemoConfig.grpo_beta, 8)
    assert cfg.use_shipped and seen["cold_start"] is None
