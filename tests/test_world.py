"""The synthetic personalization world: rendering, the patch VQ tokenizer, tokens, X-CoT examples, rewards."""
import pytest
import torch

from mmr1.rewards import format_reward
from mmr1.rollout import Rollout, XCoTFormat
from mmr1.tokens import pad_sequences
from mmr1.world import (BACKGROUNDS, GRID, PairScene, PatchVQ, Scene, Subject, all_subjects, analyze, load_world,
                        random_pair_scene, random_scene, render, save_world, subject_similarity, subject_view,
                        text_alignment)


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


A, B = Subject("circle", "red", "stripes", "blue"), Subject("square", "green")


def test_pair_scenes_render_both_subjects_and_reject_bad_input():
    pair = PairScene(A, B, "sand", "right")
    img = render(pair)
    # each half is exactly the one-subject render of its subject at that side
    for subject, side in ((A, "right"), (B, "left")):
        alone = render(Scene(subject, "sand", side, "small"))
        half = slice(16, 32) if side == "right" else slice(0, 16)
        assert torch.equal(img[:, half], alone[:, half])
    assert pair.prompt() == "my first subject at the right and my second subject at the left on sand"
    view = subject_view(pair)
    assert view.background == "white" and view.first_position == "right"
    assert isinstance(random_pair_scene(A, B, torch.Generator().manual_seed(0)), PairScene)
    with pytest.raises(ValueError, match="first_position"):
        PairScene(A, B, "sand", "center")
    with pytest.raises(ValueError, match="two different subjects"):
        PairScene(A, A, "sand", "left")


def test_pair_rewards_locate_each_subject_like_psr():
    pair = PairScene(A, B, "sky", "left")
    ideal = render(pair)
    assert text_alignment(ideal, pair) == 1.0 and subject_similarity(ideal, pair) == pytest.approx(1.0)
    # subjects swapped: the layout is wrong, but each subject is still found (PSR's located comparison)
    swapped = render(PairScene(A, B, "sky", "right"))
    assert text_alignment(swapped, pair) == pytest.approx(1 / 3)
    assert subject_similarity(swapped, pair) == pytest.approx(1.0)
    # one subject missing: its side fails and its consistency drops
    only_a = render(Scene(A, "sky", "left", "small"))
    assert text_alignment(only_a, pair) == pytest.approx(2 / 3)
    assert subject_similarity(only_a, pair) < 0.9
    # the first subject drawn twice: the second is never found
    twice = render(PairScene(A, Subject("circle", "red", "dots", "blue"), "sky", "left"))
    assert subject_similarity(twice, pair) < subject_similarity(swapped, pair)
    blank = torch.tensor(BACKGROUNDS["sky"], dtype=torch.uint8).expand(32, 32, 3).clone()
    assert text_alignment(blank, pair) == pytest.approx(1 / 3)


def test_pair_and_describe_examples(world):
    pair = PairScene(A, B, "gray", "left")
    refs = [Scene(A, "white", "center", "big"), Scene(B, "sky", "right", "small")]
    seq, plen = world.example(pair, refs)
    spans = world.image.find_blocks(seq)
    assert len(spans) == 4  # two references, subject image, final image
    assert world.text.decode(seq[plen + 1: seq.index(world.text.token_id("</think>"))]) == pair.plan()
    assert torch.equal(world.image.decode_block(seq[spans[3][0]:spans[3][1]]), world.vq.encode(render(pair)[None])[0])
    with pytest.raises(ValueError, match="2 subject"):
        world.prompt_ids(render(refs[0]), pair)
    d, dlen = world.describe_example(pair)
    assert d[:2] == [world.bos, world.describe] and d[dlen - 1] == world.end_of_turn
    assert world.text.decode(d[dlen:-1]) == pair.prompt() and d[-1] == world.end_of_turn
