"""Training on real checkpoints from the command line (mmr1.data, mmr1.recipe, mmr1.sharded_checkpoint): datasets
and their errors, the config flags, and end to end on tiny random local checkpoints (a transformers Chameleon, a
taming-layout VQGAN, a CLIPModel, a DINOv2) with the shared DreamBench photos: converter -> torchrun sft ->
torchrun grpo (FSDP2 and DDP) -> checkpoint -> export -> same logits (resuming: tests/test_soak.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmr1.data import ImageTokenizer, TurnTokens, XCoTData, dreambench_to_jsonl, load_grpo_prompts, load_sft_examples
from mmr1.tokens import ImageVocab, TextTokenizer, code_to_bpe_name
from mmr1.vqgan import VQConfig, VQModel

DREAMBENCH = Path(__file__).resolve().parent / "data" / "dreambench"
# 16 px images, 2 downsamplings: 4 x 4 codes per image, a 24-token block
VQ = dict(embed_dim=8, num_embeddings=16, latent_channels=8, base_channels=32, channel_multiplier=[1, 1, 2],
          num_res_blocks=1, resolution=16)
WORDS = ["a", "dog", "can", "red", "photo", "of", "sks", "the", "subject", "is", "on", "beach"]


def make_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for c in range(16):
        vocab[code_to_bpe_name(c)] = 4 + c
    for name in ["<eoss>", "<racm3:break>", "<reserved08799>", "<reserved08800>", "<reserved08801>",
                 "<reserved08802>", "<reserved08803>", "<reserved08706>", "<reserved08707>", "<reserved08708>",
                 *WORDS]:
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def make_vq(d: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vq = VQModel(VQConfig(**VQ))
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": vq.state_dict()}, d / "vqgan.ckpt")
    (d / "vq_config.json").write_text(json.dumps(VQ))
    return d / "vqgan.ckpt"


def make_chameleon(d: Path, vocab_size: int) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = ChameleonConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          vq_config=VQ, vocabulary_map={"<image>": 3, **{code_to_bpe_name(c): 4 + c for c in range(16)}})
    torch.manual_seed(0)
    ChameleonForConditionalGeneration(cfg).save_pretrained(d, safe_serialization=True)
    return d


def _images(tmp_path):
    from PIL import Image

    paths = []
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (16, 16), color).save(p)
        paths.append(p)
    return paths


def _data(tmp_path, resize=False, max_seq_len=None):
    tok = make_tokenizer(tmp_path / "tok")
    from mmr1.vqgan import load_vqgan

    vq = load_vqgan(make_vq(tmp_path / "vq"), VQConfig(**VQ))
    vocab = ImageVocab.from_tokenizer_json(tok)
    images = ImageTokenizer(vq, vocab, 16, tmp_path / "cache", resize=resize)
    return XCoTData(TextTokenizer(tok), images, TurnTokens(), max_seq_len=max_seq_len), images, vocab


def test_sft_examples_layout_weights_and_cache(tmp_path):
    data, images, vocab = _data(tmp_path)
    a, b, c = _images(tmp_path)
    rec = {"references": [a.name], "prompt": "a photo of sks dog", "reasoning": "the subject is a red dog",
           "subject_image": b.name, "final_image": c.name}
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    seqs, plens, weights = load_sft_examples(tmp_path / "sft.jsonl", data, reasoning_weight=5.0)
    assert len(seqs) == 2 and seqs[0] == seqs[1]
    s, p, w = seqs[0], plens[0], weights[0]
    ids, block = data.ids, vocab.block_length(4, 4)
    text = data.text.encode
    assert s[0] == ids["bos"] and s[1:1 + block] == images.block(a) and s[p - 1] == ids["end_of_turn"]
    assert s[1 + block:p - 1] == text("a photo of sks dog")
    reasoning = text("the subject is a red dog")
    assert s[p] == ids["think_open"] and s[p + 1:p + 1 + len(reasoning)] == reasoning
    close = p + 1 + len(reasoning)
    assert s[close] == ids["think_close"]
    assert s[close + 1:close + 1 + block] == images.block(b) and s[-1 - block:-1] == images.block(c)
    assert s[-1] == ids["end_of_turn"] and len(s) == len(w)
    assert w[p] == 1.0 and all(x == 5.0 for x in w[p + 1:close + 1]) and w[close + 1] == 1.0
    assert vocab.decode_block(images.block(a)).shape == (4, 4)
    # the cache: 3 distinct files encoded once each, everything else a hit
    assert images.misses == 3 and images.hits >= 3
    again = ImageTokenizer(images.vq, vocab, 16, tmp_path / "cache")
    assert again.block(a) == images.block(a) and again.misses == 0
    other = ImageTokenizer(VQModel(VQConfig(**VQ)), vocab, 16, tmp_path / "cache")  # another tokenizer: no reuse
    assert other.fingerprint != images.fingerprint


def test_sft_examples_in_the_other_formats(tmp_path):
    """T2I-R1's completion (reasoning, then the image) and the image alone: no subject image (nor reasoning) read,
    the reasoning weighted as in X-CoT; text-only prompts (no references) allowed."""
    data, images, vocab = _data(tmp_path)
    a, _, c = _images(tmp_path)
    rec = {"prompt": "a photo of sks dog", "reasoning": "the subject is a red dog", "final_image": c.name}
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n")
    ids, text = data.ids, data.text.encode
    (s,), (p,), (w,) = load_sft_examples(tmp_path / "sft.jsonl", data, reasoning_weight=2.0, subject_image=False)
    reasoning = text("the subject is a red dog")
    assert s[:p] == [ids["bos"]] + text("a photo of sks dog") + [ids["end_of_turn"]]
    assert s[p:] == [ids["think_open"]] + reasoning + [ids["think_close"]] + images.block(c) + [ids["end_of_turn"]]
    assert w[p] == 1.0 and w[p + 1:p + 2 + len(reasoning)] == [2.0] * (len(reasoning) + 1) and w[-1] == 1.0
    (s,), (p,), (w,) = load_sft_examples(tmp_path / "sft.jsonl", data, reasoning_weight=2.0, reasoning=False,
                                         subject_image=False)
    assert s[p:] == images.block(c) + [ids["end_of_turn"]] and set(w) == {1.0}
    with pytest.raises(ValueError, match="missing field 'subject_image'"):
        load_sft_examples(tmp_path / "sft.jsonl", data)


@pytest.mark.parametrize("mutate,match", [
    (lambda r: r.pop("prompt"), "sft.jsonl:1: missing field 'prompt'"),
    (lambda r: r.update(references="a.png"), "field 'references' must be a list of image paths"),
    (lambda r: r.update(final_image="nope.png"), "sft.jsonl:1: image .*nope.png not found"),
    (lambda r: r.update(final_image="bad.png"), "bad.png is not a readable image"),
    (lambda r: r.update(final_image="big.png"), "big.png is 32x32; the checkpoint's resolution is 16x16"),
])
def test_dataset_errors_name_file_line_and_field(tmp_path, mutate, match):
    from PIL import Image

    data, _, _ = _data(tmp_path)
    a, b, c = _images(tmp_path)
    (tmp_path / "bad.png").write_text("not an image")
    Image.new("RGB", (32, 32)).save(tmp_path / "big.png")
    rec = {"references": [a.name], "prompt": "a dog", "reasoning": "a dog", "subject_image": b.name,
           "final_image": c.name}
    mutate(rec)
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_sft_examples(tmp_path / "sft.jsonl", data)


def test_resize_context_and_prompt_errors(tmp_path):
    from PIL import Image

    a, b, c = _images(tmp_path)
    Image.new("RGB", (40, 32), (9, 9, 9)).save(tmp_path / "big.png")
    data, images, _ = _data(tmp_path, resize=True, max_seq_len=60)
    assert tuple(images.pixels(tmp_path / "big.png").shape) == (3, 16, 16)
    rec = {"references": ["big.png"], "prompt": "a dog", "reasoning": "a dog", "subject_image": b.name,
           "final_image": c.name}
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="sft.jsonl:1: the example is 8[0-9] tokens, over the model's context of 60"):
        load_sft_examples(tmp_path / "sft.jsonl", data)
    g = {"references": [a.name, b.name], "prompt": "a dog", "classes": ["dog"]}
    (tmp_path / "p.jsonl").write_text(json.dumps(g) + "\n")
    with pytest.raises(ValueError, match="'classes' names 1 subject"):
        load_grpo_prompts(tmp_path / "p.jsonl", data)
    g = {"references": [a.name], "prompt": "a dog", "classes": ["dog"], "id": "x"}
    (tmp_path / "p.jsonl").write_text(json.dumps(g) + "\n")
    with pytest.raises(ValueError, match="the prompt plus its completion is"):
        load_grpo_prompts(tmp_path / "p.jsonl", data, completion_budget=40)
    (p,) = load_grpo_prompts(tmp_path / "p.jsonl", data)
    assert p["id"] == "x" and p["classes"] == ["dog"] and tuple(p["references"].shape) == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="no think_open token"):
        XCoTData(data.text, images, TurnTokens(think_open="<think>"))


def test_dreambench_converter(tmp_path):
    out = tmp_path / "sub" / "prompts.jsonl"
    n = dreambench_to_jsonl(DREAMBENCH, out, references=2, prompts_per_subject=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(rows) == 30 * 3
    dog = [r for r in rows if r["id"].startswith("dog-")]
    assert [r["prompt"] for r in dog] == ["a sks dog in the jungle", "a sks dog in the snow", "a sks dog on the beach"]
    assert all((out.parent / ref).exists() for r in rows for ref in r["references"]) and len(dog[0]["references"]) == 2
    assert dog[0]["classes"] == ["dog"]
    with pytest.raises(FileNotFoundError, match="not a DreamBench directory"):
        dreambench_to_jsonl(tmp_path, out)


def test_config_flags_file_and_batches(tmp_path):
    import argparse

    from mmr1.grpo import GRPOConfig
    from mmr1.recipe import add_config_flags, config_from_args, parse_reward_weights, sft_batch_indices

    p = argparse.ArgumentParser()
    add_config_flags(p, GRPOConfig)
    (tmp_path / "c.json").write_text(json.dumps({"group_size": 4, "lr": 1e-4, "reward_weights": {"dino": 2.0}}))
    args = p.parse_args(["--lr", "3e-5", "--skip-zero-signal-steps", "true", "--decode", "jacobi"])
    cfg = config_from_args(GRPOConfig, args, str(tmp_path / "c.json"))
    assert (cfg.group_size, cfg.lr, cfg.skip_zero_signal_steps, cfg.sampling.decode, cfg.reward_weights) == \
        (4, 3e-5, True, "jacobi", {"dino": 2.0})
    # a nested field from the file and another from a flag: both land in the one SamplingConfig
    (tmp_path / "s.json").write_text(json.dumps({"sampling": {"cfg_scale": 2.5}}))
    cfg = config_from_args(GRPOConfig, p.parse_args(["--top-k", "7"]), str(tmp_path / "s.json"))
    assert (cfg.sampling.cfg_scale, cfg.sampling.top_k, cfg.sampling.decode) == (2.5, 7, "sequential")
    (tmp_path / "bad.json").write_text(json.dumps({"group_sise": 4}))
    with pytest.raises(SystemExit, match="unknown GRPOConfig fields"):
        config_from_args(GRPOConfig, p.parse_args([]), str(tmp_path / "bad.json"))
    with pytest.raises(SystemExit, match="group_size must be >= 2"):
        config_from_args(GRPOConfig, p.parse_args(["--group-size", "1"]), None)
    assert parse_reward_weights("format=0.5,dino,psr=2") == {"format": 0.5, "dino": 1.0, "psr": 2.0}
    with pytest.raises(SystemExit, match="unknown reward 'aesthetic'"):
        parse_reward_weights("aesthetic=1")
    # batches: every example once per epoch, deterministic, continuing across the epoch boundary
    seen = [i for step in range(5) for i in sft_batch_indices(10, 4, step, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert sft_batch_indices(10, 4, 2, seed=3) == seen[8:12]


# --------------------------------------------------------------------------- end to end under torchrun


def _torchrun(args, env_extra=None, timeout=900):
    from soak import torchrun_command

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out = subprocess.run(torchrun_command("-m", "mmr1.cli", *args), capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _load_state(ckpt_dir: Path, model_dir: Path):
    """Weights and AdamW state of a checkpoint, read into one process (DCP reshards the 2 ranks' files)."""
    from mmr1.model import load_transformer
    from mmr1.sharded_checkpoint import load_sharded

    model = load_transformer(model_dir)
    opt = torch.optim.AdamW(model.parameters())
    info = load_sharded(ckpt_dir, model, opt, restore_rng=False)
    return info, model.state_dict(), {n: opt.state[p] for n, p in model.named_parameters()}


def _real_parts(tmp_path):
    """Tiny local checkpoints (a transformers Chameleon, a VQGAN, a tokenizer) and data from the DreamBench photos:
    (vocab size, model dir, GRPO prompts, an X-CoT cold-start set, the CLI arguments naming the parts)."""
    from mmr1.cli import main as cli

    tok = make_tokenizer(tmp_path / "tok")
    vocab_size = len(json.loads(tok.read_text())["model"]["vocab"])
    model_dir = make_chameleon(tmp_path / "chameleon", vocab_size)
    vq = make_vq(tmp_path / "vq")
    prompts = tmp_path / "data" / "prompts.jsonl"
    cli(["convert-dreambench", str(DREAMBENCH), str(prompts), "--prompts-per-subject", "1"])
    subjects = sorted(p for p in DREAMBENCH.iterdir() if p.is_dir())[:4]
    sft_rows = []
    for i, s in enumerate(subjects):  # reasoning of different lengths: ranks hold different token counts
        photos = sorted(s.glob("*.jpg"))
        sft_rows.append({"references": [os.path.relpath(photos[0], prompts.parent)], "prompt": "a photo of sks dog",
                         "reasoning": "the subject is a " + "red " * (3 * i) + "dog",
                         "subject_image": os.path.relpath(photos[1], prompts.parent),
                         "final_image": os.path.relpath(photos[2], prompts.parent)})
    sft_data = prompts.parent / "xcot.jsonl"
    sft_data.write_text("\n".join(json.dumps(r) for r in sft_rows) + "\n")
    common = ["--vqgan", str(vq), "--vq-config", str(vq.parent / "vq_config.json"), "--tokenizer", str(tok),
              "--resize", "--cache-dir", str(tmp_path / "cache")]
    return vocab_size, model_dir, prompts, sft_data, common


@pytest.mark.slow
def test_sft_preempted_by_sigterm_checkpoints_its_step_and_the_rerun_is_exact(tmp_path):
    """`mmr1 sft` under SIGTERM: the step under way finishes, its checkpoint is written (no checkpoint_every), the
    process exits 75; the same command resumes there and ends with an uninterrupted run's weights and AdamW state."""
    import signal
    import time

    from mmr1.cli import main as cli

    _, model_dir, _, sft_data, common = _real_parts(tmp_path)
    sft = ["sft", "--model", str(model_dir), *common, "--data", str(sft_data), "--steps", "20", "--batch-size", "2",
           "--lr", "1e-3", "--checkpoint-every", "0"]
    cli(sft + ["--out-dir", str(tmp_path / "full")])
    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "-m", "mmr1.cli", *sft, "--out-dir", str(part)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (part / "metrics.jsonl").exists() or not (part / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    done = len((part / "metrics.jsonl").read_text().splitlines())
    info, _, _ = _load_state(part / "checkpoints", model_dir)
    assert 1 <= info["step"] == done < 20 and f"preempted by SIGTERM after step {done}" in err
    cli(sft + ["--out-dir", str(part)])  # the same command: resumes at that step
    a_info, a_w, a_opt = _load_state(part / "checkpoints", model_dir)
    b_info, b_w, b_opt = _load_state(tmp_path / "full" / "checkpoints", model_dir)
    assert a_info["step"] == b_info["step"] == 20
    for k in b_w:
        assert torch.equal(a_w[k], b_w[k]), k
    for n in b_opt:
        assert torch.equal(a_opt[n]["exp_avg_sq"], b_opt[n]["exp_avg_sq"]), n


@pytest.mark.slow
def test_end_to_end_real_parts_torchrun(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from mmr1.cli import main as cli
    from mmr1.model import load_transformer
    from test_trainer import _tiny_clip

    vocab_size, model_dir, prompts, sft_data, common = _real_parts(tmp_path)
    clip = _tiny_clip(tmp_path)
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                             num_attention_heads=4)).save_pretrained(tmp_path / "dino")
    # cold start: 2 SFT steps, 2 processes (DDP) == the same 2 steps in one process (the loss is normalized by
    # the global token weight, so ranks with more tokens weigh more)
    sft = ["sft", "--model", str(model_dir), *common, "--data", str(sft_data), "--steps", "2", "--batch-size", "4",
           "--lr", "1e-3", "--reasoning-weight", "3"]
    _torchrun(sft + ["--out-dir", str(tmp_path / "sft")])
    cli(sft + ["--out-dir", str(tmp_path / "sft_one")])
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "sft_one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    for r, o in zip(rows, one):
        assert r["loss"] == pytest.approx(o["loss"], rel=1e-5) and r["grad_norm"] == pytest.approx(o["grad_norm"],
                                                                                                 rel=1e-4)
    _, w_two, _ = _load_state(tmp_path / "sft" / "checkpoints", model_dir)
    _, w_one, _ = _load_state(tmp_path / "sft_one" / "checkpoints", model_dir)
    for k in w_one:
        torch.testing.assert_close(w_two[k], w_one[k], atol=2e-6, rtol=0, msg=k)
    cli(["export", str(tmp_path / "sft" / "checkpoints"), str(tmp_path / "sft_model")])
    grpo = ["grpo", "--model", str(tmp_path / "sft_model"), *common, "--prompts", str(prompts), "--clip", str(clip),
            "--dino", str(tmp_path / "dino"), "--rewards", "format=0.5,clip_t=1,clip_i=0.5,dino=1,psr=0.5,self=0.1,self_und=0.1",
            "--group-size", "2", "--prompts-per-step", "2", "--max-reasoning-tokens", "6", "--lr", "1e-3",
            "--beta", "0.04", "--mu", "2", "--cfg-scale", "2.0", "--sample-every", "2"]
    # FSDP2, 4 steps (resuming after SIGTERM / SIGKILL / a corrupt checkpoint == uninterrupted, bit for bit, through
    # this CLI under FSDP2: tests/test_soak.py; the same resume under DDP: tests/test_trainer.py's torchrun tests)
    full = tmp_path / "full_fsdp"
    _torchrun(grpo + ["--parallel", "fsdp", "--out-dir", str(full), "--steps", "4"])
    b_info, b_w, _ = _load_state(full / "checkpoints", tmp_path / "sft_model")
    assert b_info["step"] == 4
    log = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]
    assert {"reward/clip_t", "reward/clip_i", "reward/dino", "reward/psr", "reward/format", "reward/self",
            "reward/self_und"} <= set(log[0])
    assert (full / "samples" / "step-000002.png").exists() and (full / "samples" / "step-000004.png").exists()
    moved = any(not torch.equal(b_w[k], v) for k, v in load_transformer(tmp_path / "sft_model").state_dict().items())
    assert moved, "GRPO did not change the weights"
    # (`grpo --parallel ddp` through the CLI: tests/test_janus_cli.py; DDP and FSDP2 each take one process's steps:
    # tests/test_trainer.py -- a launch here would cost ~8 CPU-s before its first step)
    # export -> reload -> same logits as the checkpoint read through DCP
    cli(["export", str(tmp_path / "full_fsdp" / "checkpoints"), str(tmp_path / "final")])
    exported = load_transformer(tmp_path / "final")
    _, state, _ = _load_state(tmp_path / "full_fsdp" / "checkpoints", tmp_path / "sft_model")
    direct = load_transformer(tmp_path / "sft_model")
    direct.load_state_dict(state)
    tokens = torch.randint(0, vocab_size, (2, 11))
    torch.testing.assert_close(exported(tokens), direct(tokens), rtol=0, atol=0)
    # mmr1 generate on it: X-CoT, one reference photo -> reasoning on stdout, [subject | final] per sample
    from PIL import Image

    photo = sorted(sorted(p for p in DREAMBENCH.iterdir() if p.is_dir())[0].glob("*.jpg"))[0]
    cli(["generate", "--model", str(tmp_path / "final"), *common, "--prompt", "a photo of sks dog", "--reference",
         str(photo), "--max-reasoning-tokens", "3", "--cfg-scale", "2", "--out", str(tmp_path / "gen.png")])
    assert Image.open(tmp_path / "gen.png").size == (32, 16)


@pytest.mark.parametrize("cmd", ["sft", "grpo", "generate"])
def test_help_shows_both_modes(cmd, capsys):
    """`mmr1 sft|grpo|generate --help` without --model: the synthetic world's options, then the real-checkpoint
    ones."""
    from mmr1.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "Two modes" in text
    real = text.split("with --model (real checkpoints):")
    assert len(real) == 2, text[:2000]
    if cmd == "generate":
        for flag in ("--model", "--tokenizer", "--reference", "--format", "--cfg-scale", "--num-samples"):
            assert flag in real[1], flag
        assert "--parallel" not in real[1] and "--run" in real[0]
        return
    for flag in ("--model", "--vqgan", "--tokenizer", "--parallel", "--config", "--lr"):
        assert flag in real[1], flag
    if cmd == "grpo":
        for flag in ("--prompts", "--clip", "--dino", "--rewards", "--dynamic-sampling", "--attention", "--format"):
            assert flag in real[1], flag
    else:
        assert "--data" in real[1]
