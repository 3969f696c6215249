"""The synthetic personalization world: rendering, the patch VQ tokenizer, tokens, X-CoT examples, rewards."""
import pytest
import torch

from mmr1.rewards import format_reward
from mmr1.rollout import Rollout, XCoTFormat
from mmr1.tokens import pad_sequences
from mmr1.world import (BACKGROUNDS, GRID, PatchVQ, Scene, Subject, all_subjects, analyze, load_world, random_scene,
                        render, save_world, subject_similarity, subject_view, text_alignment)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    vq = PatchVQ.fit(num_codes=64, num_images=300, iters=6, seed=0)
    return save_world(tmp_path_factory.mktemp("world"), vq)


def test_subjects_and_rendering():
    subjects = all_subjects()
    assert len(subjects) == len(set(subjects)) == 1056
    s = Scene(Subject("ring", "red", "stripes", "blue"), "sky", "left", "big")
    img = render(s)
    assert img.shape == (32, 32, 3) and img.dtype == torch.uint8 and torch.equal(img, render(s))
    a = analyze(img)
    assert a["background"] == "sky" and a["position"] == "left" and a["scale"] == "big"
    small = analyze(render(Scene(Subject("circle", "green"), "black", "right", "small")))
    assert small["position"] == "right" and small["scale"] == "small" and small["background"] == "black"


def test_patch_vq_is_deterministic_and_reconstructs(world, tmp_path):
    again = PatchVQ.fit(num_codes=64, num_images=300, iters=6, seed=0)
    assert torch.equal(again.codebook, world.vq.codebook)
    g = torch.Generator().manual_seed(1)
    imgs = torch.stack([render(random_scene(s, g)) for s in all_subjects()[::97]])
    codes = world.vq.encode(imgs)
    assert codes.shape == (len(imgs), GRID, GRID)
    err = (world.vq.decode(codes).float() - imgs.float()).abs().mean()
    assert err < 12.0, f"mean reconstruction error {err:.1f}/255"
    loaded = load_world(tmp_path.parent / next(p.name for p in tmp_path.parent.iterdir() if p.name.startswith("world")))
    assert torch.equal(loaded.vq.codebook, world.vq.codebook)


def test_xcot_example_layout_and_format_reward(world):
    g = torch.Generator().manual_seed(2)
    subj = all_subjects()[123]
    scene, ref = random_scene(subj, g), random_scene(subj, g)
    seq, plen = world.example(scene, ref)
    vocab = world.image
    assert vocab.window == (4, 4 + 64)
    spans = vocab.find_blocks(seq)
    assert len(spans) == 3  # reference, subject, final
    assert torch.equal(vocab.decode_block(seq[spans[2][0]:spans[2][1]]), world.vq.encode(render(scene)[None])[0])
    assert world.text.decode(seq[plen + 1: seq.index(world.text.token_id("</think>"))]) == scene.plan()
    fmt = XCoTFormat(think_open=world.text.token_id("<think>"), think_close=world.text.token_id("</think>"),
                     end_of_turn=world.end_of_turn, subject_hw=(GRID, GRID), final_hw=(GRID, GRID))
    tokens, lengths = pad_sequences([seq])
    ro = Rollout(tokens=tokens, lengths=lengths, prompt_lengths=torch.tensor([plen - 0]),
                 chosen=torch.zeros_like(tokens, dtype=torch.bool), logprobs=torch.zeros(tokens.shape),
                 image_positions=torch.zeros_like(tokens, dtype=torch.bool),
                 subject_codes=torch.zeros(1, GRID, GRID, dtype=torch.long),
                 final_codes=torch.zeros(1, GRID, GRID, dtype=torch.long))
    # the prompt ends with end-of-turn; the completion starts at <think>
    assert seq[plen] == fmt.think_open
    ro.prompt_lengths = torch.tensor([plen + 1])
    assert format_reward(ro, vocab, fmt)[0].item() == 1.0


def test_procedural_rewards_are_exact_on_ideal_images():
    scene = Scene(Subject("triangle", "yellow", "dots", "purple"), "gray", "center", "small")
    ideal = render(scene)
    assert text_alignment(ideal, scene) == 1.0 and subject_similarity(ideal, scene) == pytest.approx(1.0)
    wrong_bg = render(Scene(scene.subject, "white", "center", "small"))
    assert text_alignment(wrong_bg, scene) == pytest.approx(2 / 3)
    other = render(Scene(Subject("square", "blue"), "gray", "center", "small"))
    assert subject_similarity(other, scene) < 0.8
    blank = torch.tensor(BACKGROUNDS["gray"], dtype=torch.uint8).expand(32, 32, 3).clone()
    assert text_alignment(blank, scene) == pytest.approx(1 / 3)  # the background alone
    assert subject_view(scene.subject).position == "center"
