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
