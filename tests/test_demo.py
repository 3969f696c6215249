"""The demo pipeline end to end at toy settings, and the CLI's generate command on its output."""
import json

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_pipeline_and_cli_generate(tmp_path):
    from mmr1.cli import main as cli
    from mmr1.demo import DemoConfig, run
    from mmr1.world import Scene, Subject, render

    out = tmp_path / "demo"
    summary = run(DemoConfig(out_dir=str(out), sft_steps=20, grpo_steps=3, eval_prompts=6, sft_batch=4))
    for k in ("format", "subject", "text"):
        mean, half = summary["before"][k]
        assert 0.0 <= mean <= 1.0 and half >= 0.0
    for name in ("grid.png", "reward_curve.png", "log.jsonl", "grpo.jsonl", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert len((out / "grpo.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["rollout_tok_s"] > 0
    ref = tmp_path / "ref.png"
    Image.fromarray(render(Scene(Subject("circle", "red", "dots", "blue"), "sky", "left", "big")).numpy()).save(ref)
    cli(["generate", "--run", str(out), "--prompt", "my subject small at the right on sand", "--reference", str(ref),
         "--out", str(tmp_path / "x.png")])
    img = np.asarray(Image.open(tmp_path / "x.png"))
    assert img.shape == (128, 384, 3)
    with pytest.raises(SystemExit, match="outside the world's vocabulary"):
        cli(["generate", "--run", str(out), "--prompt", "my subject on mars", "--reference", str(ref)])
    with pytest.raises(SystemExit, match="not found"):
        cli(["generate", "--run", str(tmp_path / "nope"), "--prompt", "x", "--reference", str(ref)])


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

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"
    if not root.exists():
        pytest.skip("shared/data/dreambench not present")
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
         "--steps", "2"])
    assert len((tmp_path / "grpo" / "grpo.jsonl").read_text().splitlines()) == 2
    with pytest.raises(SystemExit, match="no model at"):
        cli(["grpo", "--cold-start", str(tmp_path / "missing")])
