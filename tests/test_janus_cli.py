"""Janus-Pro through the command line, end to end (GRPO under torchrun, 2 processes), on
tiny random checkpoints in both layouts -- one written by transformers' save_pretrained, one in DeepSeek's original names -- with the DreamBench
photos as reference images (read through the understanding path) and as SFT targets (through the VQ-16):
sft -> export into the base's layout -> grpo -> SIGTERM -> resume == uninterrupted, bit for bit -> export ->
transformers' own JanusForConditionalGeneration loads it and gives our logits."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import soak
from test_janus import save_deepseek_layout
from test_recipe import DREAMBENCH, _torchrun

SPECIAL = ["<unk>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<begin_of_image>",
           "<end_of_image>", "<image_placeholder>", "<eot>", "<think>", "</think>"]
WORDS = ["a", "photo", "of", "sks", "dog", "the", "subject", "is", "red", "on", "beach", "in", "with"]
TURN = ["--bos-token", "<｜begin▁of▁sentence｜>", "--end-of-turn-token", "<eot>", "--think-open-token", "<think>",
        "--think-close-token", "</think>"]


def make_janus(d: Path, layout: str) -> Path:
    """A tiny Janus-Pro (32 px images: SigLIP 8 px patches -> 16 understanding tokens, VQ 8x -> 4 x 4 codes) and
    its tokenizer.json, in transformers' layout (save_pretrained) or DeepSeek's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
    from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

    vocab = {name: i for i, name in enumerate(SPECIAL + WORDS)}
    text = LlamaConfig(vocab_size=len(vocab), hidden_size=48, intermediate_size=83, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                       pad_token_id=3, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                               projection_dim=48, depth=2, num_image_tokens=16, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1, 1, 1],
                          num_res_blocks=1, latent_channels=32, projection_dim=48, image_token_embed_dim=48,
                          num_hidden_layers=2, num_patches=4)
    torch.manual_seed(0)
    hf = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                   image_token_id=6, tie_word_embeddings=False))
    if layout == "transformers":
        hf.save_pretrained(d)
    else:
        save_deepseek_layout(hf, d, boi=4, eoi=5)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    return d


def janus_data(root: Path):
    """GRPO prompts (one DreamBench photo each, as a reference) and X-CoT cold-start examples."""
    from mmr1.cli import main as cli

    prompts = root / "data" / "prompts.jsonl"
    cli(["convert-dreambench", str(DREAMBENCH), str(prompts), "--prompts-per-subject", "1"])
    rows = []
    for i, s in enumerate(sorted(p for p in DREAMBENCH.iterdir() if p.is_dir())[:4]):
        photos = [os.path.relpath(p, prompts.parent) for p in sorted(s.glob("*.jpg"))]
        rows.append({"references": [photos[0]], "prompt": "a photo of sks dog",
                     "reasoning": "the subject is a " + "red " * (2 * i) + "dog", "subject_image": photos[1],
                     "final_image": photos[2]})
    sft = prompts.parent / "xcot.jsonl"
    sft.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return prompts, sft


def dcp_state(ckpt: Path, model_dir: Path):
    from mmr1.model import load_model
    from mmr1.sharded_checkpoint import load_sharded

    model = load_model(model_dir)
    info = load_sharded(ckpt, model, None, restore_rng=False)
    return info, model


@pytest.mark.slow
@pytest.mark.parametrize("layout,parallel", [("transformers", "fsdp"), ("deepseek", "ddp")])
def test_janus_sft_export_grpo_resume_export_under_torchrun(tmp_path, layout, parallel):
    from mmr1.cli import main as cli
    from mmr1.janus import load_janus

    base = make_janus(tmp_path / "janus", layout)
    prompts, sft_data = janus_data(tmp_path)
    common = ["--tokenizer", str(base / "tokenizer.json"), "--resize", "--cache-dir", str(tmp_path / "cache"), *TURN]
    sft = ["sft", "--model", str(base), *common, "--data", str(sft_data), "--steps", "2", "--batch-size", "4",
           "--lr", "1e-3"]
    # one process (SFT on Janus under DDP: tests/test_janus.py; SFT through the CLI under torchrun:
    # tests/test_recipe.py -- a launch costs ~8 CPU-s before its first step)
    cli(sft + ["--out-dir", str(tmp_path / "sft")])
    assert [json.loads(x)["step"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    with pytest.raises(SystemExit, match="pass base"):
        cli(["export", str(tmp_path / "sft" / "checkpoints"), str(tmp_path / "nope")])
    cli(["export", str(tmp_path / "sft" / "checkpoints"), str(tmp_path / "sft_model"), "--base", str(base)])
    # the export: the base's layout, its files, the trained weights in place and the frozen towers untouched
    _, trained = dcp_state(tmp_path / "sft" / "checkpoints", base)
    exported = load_janus(tmp_path / "sft_model")
    assert json.loads((tmp_path / "sft_model" / "config.json").read_text()) == \
        json.loads((base / "config.json").read_text())
    assert (tmp_path / "sft_model" / "tokenizer.json").exists()
    moved = [k for k, v in load_janus(base).state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert "gen_head.vision_head.weight" in moved and "lm_head.weight" in moved  # codes and reasoning both trained
    for k, v in exported.state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k
    from mmr1.janus import load_janus_understanding, load_janus_vq

    pix = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(load_janus_understanding(tmp_path / "sft_model").features(pix),
                       load_janus_understanding(base).features(pix))
    assert torch.equal(load_janus_vq(tmp_path / "sft_model").encode(pix), load_janus_vq(base).encode(pix))

    steps = 6
    job = ["grpo", "--model", str(tmp_path / "sft_model"), *common, "--prompts", str(prompts), "--rewards",
           "format=0.5,self=1", "--group-size", "2", "--prompts-per-step", "2", "--max-reasoning-tokens", "4",
           "--lr", "1e-3", "--beta", "0.04", "--mu", "2", "--cfg-scale", "2.0", "--cfg-loss", "guided", "--steps", str(steps),
           "--checkpoint-every", "3", "--parallel", parallel]
    run = tmp_path / "grpo"
    if layout == "deepseek":  # the loaders and the export in DeepSeek's names; resuming is the same code either way
        _torchrun(job + ["--out-dir", str(run), "--steps", "2"])
    else:
        _torchrun(job + ["--out-dir", str(tmp_path / "full")])
        log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(steps)) and {"reward/format", "reward/self"} <= set(log[0])
        # preempted: SIGTERM to torchrun and both workers after a logged step; the step under way finishes, is
        # checkpointed, exit 75; the same command resumes there and ends where the uninterrupted run did
        plan = soak.interrupted_launch(job, run, soak.Interruption("sigterm-all", 2, 0.0), tmp_path / "part.log",
                                       step_seconds=2.0)
        assert plan.sent and plan.preempted and plan.steps_lost == 0 and plan.last_logged < steps, \
            (plan, (tmp_path / "part.log").read_text()[-3000:])
        _torchrun(job + ["--out-dir", str(run)])
        assert soak.same_state(tmp_path / "full" / "checkpoints", run / "checkpoints", job)
    # export -> our loader and (transformers' layout) transformers' own model: the checkpoint's logits
    cli(["export", str(run / "checkpoints"), str(tmp_path / "final"), "--base", str(tmp_path / "sft_model")])
    _, direct = dcp_state(run / "checkpoints", tmp_path / "sft_model")
    final = load_janus(tmp_path / "final")
    start = load_janus(tmp_path / "sft_model").state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in direct.state_dict().items()), "GRPO did not train"
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 4], [1, 15, 16, 17, 18, 19, 4]])
    codes = torch.randint(0, 64, (2, 5)) + direct.text_vocab
    tokens = torch.cat([ids, codes], 1)
    with torch.no_grad():
        want = direct.logits(direct(tokens))
        torch.testing.assert_close(final.logits(final(tokens)), want, rtol=0, atol=0)
    # mmr1 generate on the export: T2I-R1's format (reasoning, then the image), a reference photo, 2 samples
    photo = sorted(sorted(p for p in DREAMBENCH.iterdir() if p.is_dir())[0].glob("*.jpg"))[0]
    out = cli(["generate", "--model", str(tmp_path / "final"), *common, "--prompt", "a photo of sks dog",
               "--reference", str(photo), "--format", "reasoning", "--max-reasoning-tokens", "3", "--cfg-scale", "2",
               "--num-samples", "2", "--out", str(tmp_path / "gen.png")])
    from PIL import Image

    assert Image.open(tmp_path / "gen.png").size == (32, 64)  # a row per sample, the final image alone
    if layout == "transformers":
        from transformers import JanusForConditionalGeneration

        hf = JanusForConditionalGeneration.from_pretrained(tmp_path / "final").eval()
        with torch.no_grad():
            emb = torch.cat([hf.get_input_embeddings()(ids), hf.prepare_embeddings_for_image_generation(codes - direct.text_vocab)], 1)
            hidden = hf.model.language_model(inputs_embeds=emb).last_hidden_state
            theirs = torch.cat([hf.lm_head(hidden), hf.model.generation_head(hidden)], -1)
        torch.testing.assert_close(theirs, want, atol=2e-5, rtol=1e-5)
