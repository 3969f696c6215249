"""The synthetic personalization world: tiles, the exact VQ, identity round trips, identity metrics and rewards."""
import json

import pytest
import torch

from mmr1.rewards import format_reward
from mmr1.rollout import Rollout
from mmr1.tokens import pad_sequences
from mmr1.world import (BACKGROUNDS, CELL, COLORS, GRID, POSITION_NAMES, SCALES, SIZE, PairScene, PatchVQ, Scene,
                        Subject, all_subjects, load_world, render, save_world, subject_view)
from mmr1.world.identity import IdentityJudge, judge_text, parse_subjects
from mmr1.world.tasks import random_task, split_subjects, xcot_format

VQ = PatchVQ.build()
JUDGE = IdentityJudge(VQ)
A = Subject("cross", "red", "stripes", "yellow")
B = Subject("square", "green")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_world(tmp_path_factory.mktemp("world"), VQ)


def codes(scene):
    return VQ.encode(render(scene)[None])[0]


# --------------------------------------------------------------------------- subjects, tiles, rendering

def test_subject_space_and_validation():
    subjects = all_subjects()
    assert len(subjects) == len(set(subjects)) == 1056
    with pytest.raises(ValueError, match="shape"):
        Subject("hexagon", "red")
    with pytest.raises(ValueError, match="pattern_color"):
        Subject("ring", "red", "stripes")
    with pytest.raises(ValueError, match="pattern_color must be a color other than"):
        Subject("ring", "red", "stripes", "red")
    with pytest.raises(ValueError, match="bad scene"):
        Scene(A, "mars", "left", "big")
    train, held = split_subjects(0, 0.1)
    assert len(held) == 105 and not set(train) & set(held) and len(train) + len(held) == 1056


def test_render_paints_the_cells_the_shape_map_names():
    """Pixel-level check, independent of the VQ: a small solid square at the center of sky covers exactly the
    box's 3 x 3 cells; a big striped square paints 2-px pattern-color bands inside its full cells."""
    img = render(Scene(Subject("square", "red"), "sky", "center", "small")).long()
    assert img.shape == (SIZE, SIZE, 3)
    inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    inside[2 * CELL:5 * CELL, 2 * CELL:5 * CELL] = True
    assert bool((img[inside] == torch.tensor(COLORS["red"])).all())
    assert bool((img[~inside] == torch.tensor(BACKGROUNDS["sky"])).all())
    big = render(Scene(Subject("square", "blue", "stripes", "yellow"), "black", "left", "big")).long()
    cell = big[CELL:2 * CELL, 0:CELL]  # a full cell of the box (rows 1..5, cols 0..4)
    cols = torch.arange(CELL)
    yellow = (cell == torch.tensor(COLORS["yellow"])).all(-1)
    assert torch.equal(yellow, ((cols // 2) % 2 == 1).expand(CELL, CELL))
    # a star's tips are partial tiles: some pixels of its top cell are background
    star = render(Scene(Subject("star", "green"), "white", "center", "big")).long()
    top = star[CELL:2 * CELL, 3 * CELL:4 * CELL]
    assert 0 < int((top == torch.tensor(COLORS["green"])).all(-1).sum()) < CELL * CELL


def test_pair_scene_halves_are_the_single_renders():
    pair = PairScene(A, B, "sand", "right")
    img = render(pair)
    for subject, side in ((A, "right"), (B, "left")):
        alone = render(Scene(subject, "sand", side, "small"))
        half = slice(SIZE // 2, SIZE) if side == "right" else slice(0, SIZE // 2)
        assert torch.equal(img[:, half], alone[:, half])
    assert pair.prompt() == "my first subject at the right and my second subject at the left on sand"
    assert subject_view(pair).background == "white" and subject_view(pair).first_position == "right"
    with pytest.raises(ValueError, match="first_position"):
        PairScene(A, B, "sand", "center")
    with pytest.raises(ValueError, match="two different subjects"):
        PairScene(A, A, "sand", "left")


# --------------------------------------------------------------------------- the VQ carries identity

def test_codebook_is_the_distinct_cell_patches():
    assert VQ.num_codes == 501
    assert torch.unique(VQ.codebook, dim=0).shape[0] == VQ.num_codes  # no two codes decode alike
    assert torch.equal(PatchVQ.build().codebook, VQ.codebook)  # deterministic
    s = Scene(A, "sky", "left", "big")
    assert torch.equal(codes(s), VQ.scene_codes(s))
    with pytest.raises(ValueError, match="images must be"):
        VQ.encode(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


def test_every_subject_renders_differently_at_every_placement():
    """Nearest-ideal-render classification is well defined: no two of the 1056 subjects look alike anywhere."""
    for bg in BACKGROUNDS:
        for pos in POSITION_NAMES:
            for scale in SCALES:
                ideal = JUDGE.ideal(bg, pos, scale).reshape(1056, -1)
                assert torch.unique(ideal, dim=0).shape[0] == 1056, (bg, pos, scale)


def test_vq_round_trip_keeps_identity_of_held_out_subjects():
    """render -> encode -> decode -> encode of held-out one- and two-subject scenes is still classified as the
    right subject(s) on the right side(s) (nearest ideal render among all 1056 at the located placement)."""
    _, held = split_subjects(0, 0.1)
    g = torch.Generator().manual_seed(0)
    right = total = 0
    for pair in (False, True):
        for _ in range(len(held)):
            scene, _ = random_task(held, g, pair)
            again = VQ.encode(VQ.decode(codes(scene)[None]))[0]
            j = JUDGE.judge_image(again, scene)
            right += int(j["whole"] == 1.0 and j["layout"] == 1.0)
            total += 1
    assert right / total >= 0.99, f"identity kept in {right}/{total} round trips"


def test_encoding_is_robust_to_pixel_noise():
    scene = PairScene(A, Subject("ring", "blue", "checker", "pink"), "gray", "left")
    img = render(scene).float() + torch.randn(SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 20
    assert torch.equal(VQ.encode(img.clamp(0, 255).to(torch.uint8)[None])[0], VQ.scene_codes(scene))


def test_save_and_load_world(tmp_path):
    saved = save_world(tmp_path / "w", VQ)
    again = load_world(tmp_path / "w")
    assert torch.equal(again.vq.codebook, VQ.codebook) and again.vq.keys == VQ.keys
    assert again.text.tok.get_vocab() == saved.text.tok.get_vocab()
    assert json.loads((tmp_path / "w" / "world.json").read_text())["codes"] == 501
    (tmp_path / "w" / "world.json").write_text(json.dumps({"world_version": 2}))
    with pytest.raises(ValueError, match="world version 2"):
        load_world(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="vq.safetensors not found"):
        load_world(tmp_path / "nope")


# --------------------------------------------------------------------------- identity reward: failure cases

def test_identity_reward_ranks_the_right_subject_clearly_above_look_alikes():
    scene = Scene(A, "sky", "left", "big")
    right = JUDGE.identity_reward(codes(scene), scene)
    assert right == 1.0
    look_alikes = {
        "right colours, wrong shape": Subject("square", "red", "stripes", "yellow"),
        "right shape, wrong pattern": Subject("cross", "red", "rows", "yellow"),
        "right shape, wrong pattern colour": Subject("cross", "red", "stripes", "blue"),
        "colours swapped": Subject("cross", "yellow", "stripes", "red"),
        "a plain blob of the main colour": Subject("circle", "red"),
    }
    for what, other in look_alikes.items():
        r = JUDGE.identity_reward(codes(Scene(other, "sky", "left", "big")), scene)
        assert r <= 0.375, f"{what}: {r}"
    blank = torch.full((GRID, GRID), VQ.code_of[(".", None, "solid", None, "sky")])
    assert JUDGE.identity_reward(blank, scene) == 0.0
    # the subject where it was not asked: identity is about what is drawn (layout is the other reward)
    moved = Scene(A, "black", "right", "small")
    assert JUDGE.identity_reward(codes(moved), scene) == 1.0 and JUDGE.layout(codes(moved), scene) == 0.0


def test_identity_reward_sees_what_pixel_similarity_does_not():
    """The old subject reward (pixel L1 similarity) scores a right-coloured wrong shape almost as high as the right
    subject; the identity reward does not."""
    scene = Scene(A, "sky", "center", "big")
    ideal = render(scene).float()

    def pixel_similarity(img):
        return 1.0 - float((img.float() - ideal).abs().mean()) / 255.0

    wrong = Scene(Subject("star", "red", "stripes", "yellow"), "sky", "center", "big")
    assert pixel_similarity(render(wrong)) > 0.9
    assert JUDGE.identity_reward(codes(wrong), scene) < 0.4


def test_pair_identity_is_psr_pairwise_consistency():
    pair = PairScene(A, B, "sky", "left")
    assert JUDGE.identity_reward(codes(pair), pair) == 1.0 and JUDGE.layout(codes(pair), pair) == 1.0
    swapped = PairScene(A, B, "sky", "right")  # both found (PSR locates them), sides wrong
    assert JUDGE.identity_reward(codes(swapped), pair) == 1.0
    assert JUDGE.layout(codes(swapped), pair) == pytest.approx(1 / 3)
    assert JUDGE.judge_image(codes(swapped), pair)["whole"] == 0.0  # not on their sides
    only_a = Scene(A, "sky", "left", "small")  # the second subject missing
    assert JUDGE.identity_reward(codes(only_a), pair) == 0.5
    twice = PairScene(A, Subject("cross", "red", "stripes", "blue"), "sky", "left")  # A and a look-alike of A
    assert JUDGE.identity_reward(codes(twice), pair) < 0.6
    other_pair = PairScene(B, Subject("ring", "pink"), "sky", "left")  # the other subject of the pair, and a stranger
    assert JUDGE.identity_reward(codes(other_pair), pair) < 0.7


# --------------------------------------------------------------------------- identity metrics on hand-made outputs

def test_judge_image_per_attribute_and_layout():
    scene = Scene(A, "gray", "right", "small")
    assert JUDGE.judge_image(codes(scene), scene) == {"shape": 1.0, "color": 1.0, "pattern": 1.0,
                                                      "pattern_color": 1.0, "whole": 1.0, "layout": 1.0}
    wrong_color = Scene(Subject("cross", "blue", "stripes", "yellow"), "gray", "right", "small")
    assert JUDGE.judge_image(codes(wrong_color), scene) == {"shape": 1.0, "color": 0.0, "pattern": 1.0,
                                                            "pattern_color": 1.0, "whole": 0.0, "layout": 1.0}
    big_center = Scene(A, "white", "center", "big")
    j = JUDGE.judge_image(codes(big_center), scene)
    assert j["whole"] == 1.0 and j["layout"] == 0.0
    # a pair image: the second subject's pattern colour wrong
    pair = PairScene(A, Subject("ring", "blue", "checker", "pink"), "sand", "left")
    drawn = PairScene(A, Subject("ring", "blue", "checker", "green"), "sand", "left")
    j = JUDGE.judge_image(codes(drawn), pair)
    assert j["pattern_color"] == 0.5 and j["shape"] == 1.0 and j["whole"] == 0.0 and j["layout"] == 1.0
    # half the image cut away: one side empty
    half = codes(pair).clone()
    half[:, 4:] = VQ.code_of[(".", None, "solid", None, "sand")]
    j = JUDGE.judge_image(half, pair)
    assert j["whole"] == 0.0 and j["shape"] == 0.5 and j["layout"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="code grid"):
        JUDGE.judge_image(torch.zeros(8, 8, dtype=torch.long), scene)


def test_judge_text_reads_the_reasoning():
    scene = Scene(A, "gray", "right", "small")
    assert judge_text(scene.plan(), scene)["whole"] == 1.0
    assert parse_subjects(scene.plan()) == [A]
    j = judge_text("subject is a red cross with blue stripes ; place it small at the right on gray", scene)
    assert j == {"shape": 1.0, "color": 1.0, "pattern": 1.0, "pattern_color": 0.0, "whole": 0.0}
    assert judge_text("subject is a red blob with yellow stripes", scene)["whole"] == 0.0  # unknown shape
    assert judge_text("subject is a", scene) == {"shape": 0.0, "color": 0.0, "pattern": 0.0, "pattern_color": 0.0,
                                                 "whole": 0.0}
    pair = PairScene(A, B, "sky", "left")
    assert judge_text(pair.plan(), pair)["whole"] == 1.0
    swapped = PairScene(B, A, "sky", "left").plan()  # the right subjects in the wrong order
    assert judge_text(swapped, pair)["whole"] == 0.0
    assert judge_text(Scene(A, "sky", "left", "big").plan(), pair)["whole"] == 0.0  # one subject named of two
    # the layout half of the plan never counts as a subject
    assert parse_subjects("subject is a green square with solid ; place it a red cross with solid") == [B]


# --------------------------------------------------------------------------- token sequences

def _as_rollout(seq, plen, fmt):
    tokens, lengths = pad_sequences([seq])
    return Rollout(tokens=tokens, lengths=lengths, prompt_lengths=torch.tensor([plen + int(fmt.reasoning)]),
                   chosen=torch.zeros_like(tokens, dtype=torch.bool), logprobs=torch.zeros(tokens.shape),
                   image_positions=torch.zeros_like(tokens, dtype=torch.bool), subject_codes=None,
                   final_codes=torch.zeros(1, GRID, GRID, dtype=torch.long))


def test_xcot_and_direct_examples_and_their_format(world):
    g = torch.Generator().manual_seed(2)
    scene, refs = random_task(all_subjects(), g, pair=False)
    seq, plen = world.example(scene, refs)
    vocab = world.image
    assert vocab.window == (4, 4 + 501)
    spans = vocab.find_blocks(seq)
    assert len(spans) == 3  # reference, subject, final
    assert torch.equal(vocab.decode_block(seq[spans[0][0]:spans[0][1]]), codes(refs[0]))
    assert torch.equal(vocab.decode_block(seq[spans[2][0]:spans[2][1]]), codes(scene))
    assert world.text.decode(seq[plen + 1: seq.index(world.text.token_id("</think>"))]) == scene.plan()
    fmt = xcot_format(world)
    assert seq[plen] == fmt.think_open
    assert format_reward(_as_rollout(seq, plen, fmt), vocab, fmt)[0].item() == 1.0
    # the direct policy: the same prompt, then only the final image
    dseq, dplen = world.example(scene, refs, direct=True)
    assert dseq[:dplen] == seq[:plen] and len(vocab.find_blocks(dseq[dplen:])) == 1
    dfmt = xcot_format(world, direct=True)
    assert format_reward(_as_rollout(dseq, dplen, dfmt), vocab, dfmt)[0].item() == 1.0
    assert format_reward(_as_rollout(seq, plen, dfmt), vocab, dfmt)[0].item() == 0.0  # X-CoT is not direct
    assert format_reward(_as_rollout(dseq, dplen, fmt), vocab, fmt)[0].item() == 0.0


def test_pair_and_describe_examples(world):
    pair = PairScene(A, B, "gray", "left")
    refs = [Scene(A, "white", "center", "big"), Scene(B, "sky", "right", "small")]
    seq, plen = world.example(pair, refs)
    assert len(world.image.find_blocks(seq)) == 4  # two references, subject image, final image
    assert world.text.decode(seq[plen + 1: seq.index(world.text.token_id("</think>"))]) == pair.plan()
    assert world.prompt_ids([render(r) for r in refs], pair) == seq[:plen]  # pixels in, same tokens
    with pytest.raises(ValueError, match="2 subject"):
        world.prompt_ids(render(refs[0]), pair)
    d, dlen = world.describe_example(pair)
    assert d[:2] == [world.bos, world.describe] and d[dlen - 1] == world.end_of_turn
    assert world.text.decode(d[dlen:-1]) == pair.prompt() and d[-1] == world.end_of_turn


def test_consistency_reward_compares_the_reasoning_with_the_image():
    scene = Scene(A, "sky", "left", "big")
    assert JUDGE.consistency(scene.plan(), codes(scene), scene) == 1.0
    other = Scene(Subject("square", "red", "stripes", "yellow"), "sky", "left", "big")
    assert JUDGE.consistency(scene.plan(), codes(other), scene) == 0.375  # says cross, draws a square
    assert JUDGE.consistency(other.plan(), codes(other), scene) == 1.0  # wrong, but consistent (no ground truth)
    assert JUDGE.consistency("subject is a", codes(scene), scene) == 0.0
    pair = PairScene(A, B, "sky", "left")
    assert JUDGE.consistency(pair.plan(), codes(pair), pair) == 1.0
    assert JUDGE.consistency(pair.plan(), codes(PairScene(A, B, "sky", "right")), pair) < 0.5  # sides swapped


# --------------------------------------------------------------------------- the flawed data pipeline

def test_pipeline_flaws_happen_at_their_stated_rates():
    from mmr1.world.pipeline import DataFlaws, flaw_rates

    train, _ = split_subjects(0, 0.1)
    rates = flaw_rates(train, DataFlaws(), n=3000, seed=1)
    assert abs(rates["wrong_side"] - 0.1) < 0.025 and abs(rates["dropped_pattern"] - 0.1) < 0.025
    assert 0.24 < rates["identity_mixing"] <= 0.3  # drawn at 0.3; a few pairs have no valid mixing
    assert abs(rates["caption_error"] - 0.1) < 0.02 and 0.35 < rates["any_pair_flaw"] < 0.5
    assert all(v == 0.0 for v in flaw_rates(train, DataFlaws.clean(), n=500).values())
    with pytest.raises(ValueError, match="identity_mixing must be a rate"):
        DataFlaws(identity_mixing=1.5)


def test_each_flaw_does_what_it_says():
    from mmr1.world.pipeline import DataFlaws, flawed_targets, mixing_options

    g = torch.Generator().manual_seed(0)
    train, _ = split_subjects(0, 0.1)
    seen = set()
    for _ in range(400):
        scene, _ = random_task(train, g, pair=True)
        drawn, captioned, applied = flawed_targets(scene, DataFlaws(0.5, 0.5, 0.5, 0.5), g)
        seen |= set(applied)
        first, second = drawn.first, drawn.second
        if "identity_mixing" in applied and "dropped_pattern" not in applied:
            assert second in mixing_options(scene.first, scene.second) and first == scene.first
        if "wrong_side" in applied:
            assert drawn.first_position != scene.first_position
        else:
            assert drawn.first_position == scene.first_position
        if "dropped_pattern" in applied:
            assert "solid" in (first.pattern, second.pattern)
        if not applied or applied == ["caption_error"]:
            assert drawn == scene
        if "caption_error" in applied:  # one attribute word of one subject; the placement words stay
            diff = [(a, b) for a, b in zip(scene.plan().split(), captioned.plan().split()) if a != b]
            assert 1 <= len(diff) <= 2 and captioned.background == scene.background
        else:
            assert captioned == scene
    assert seen == {"identity_mixing", "wrong_side", "dropped_pattern", "caption_error"}
    one, _ = random_task(train, g, pair=False)  # single-subject targets are drawn right
    for _ in range(20):
        assert flawed_targets(one, DataFlaws(1, 1, 1, 0), g)[0] == one


def test_flawed_examples_keep_the_prompt_and_the_task_stream(world):
    """The prompt and its references are the user's: only the completion is flawed. With the flaws' own
    generator the examples are the same tasks whatever the rates."""
    from mmr1.world.pipeline import DataFlaws
    from mmr1.world.tasks import TaskMix, sft_batch

    train, _ = split_subjects(0, 0.1)
    out = {}
    for name, flaws in (("clean", DataFlaws.clean()), ("flawed", DataFlaws(0.6, 0.3, 0.3, 0.3))):
        g, fg = torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)
        out[name] = sft_batch(world, train, g, TaskMix(batch_size=64, pair_frac=0.5, flaws=flaws), fg)
    (cs, cp, _), (fs, fp, _) = out["clean"], out["flawed"]
    assert cp == fp and all(c[:p] == f[:p] for c, f, p in zip(cs, fs, cp))
    assert sum(c != f for c, f in zip(cs, fs)) >= 10  # and the flaws did change completions


def test_failure_modes_read_from_images():
    from mmr1.world.pipeline import failure_modes, mixing_options

    first, second = Subject("cross", "red", "stripes", "yellow"), Subject("ring", "green", "checker", "blue")
    scene = PairScene(first, second, "sky", "left")
    read = lambda s: JUDGE.read(codes(s), True)  # noqa: E731
    assert failure_modes(read(scene), scene) == {"mixing": 0.0, "swapped": 0.0, "dropped_pattern": 0.0}
    mixed = mixing_options(first, second)
    assert Subject("ring", "red", "checker", "blue") in mixed
    assert failure_modes(read(PairScene(first, mixed[0], "sky", "left")), scene)["mixing"] == 1.0
    assert failure_modes(read(PairScene(first, second, "sky", "right")), scene)["swapped"] == 1.0
    plain = PairScene(first, Subject("ring", "green"), "sky", "left")
    assert failure_modes(read(plain), scene)["dropped_pattern"] == 1.0
    bled = PairScene(Subject("cross", "red", "checker", "yellow"), second, "sky", "left")  # the first takes the
    assert failure_modes(read(bled), scene)["mixing"] == 1.0  # second's pattern: mixing in the other direction
    other = PairScene(first, Subject("ring", "purple", "checker", "blue"), "sky", "left")  # wrong, not the first's
    assert failure_modes(read(other), scene) == {"mixing": 0.0, "swapped": 0.0, "dropped_pattern": 0.0}
    # the second subject on both sides: the first is missing, nothing is swapped
    both_second = {**read(scene), scene.first_position: second}
    assert failure_modes(both_second, scene)["swapped"] == 0.0
    both_first = {**read(scene), scene.second_position: first}
    assert failure_modes(both_first, scene)["swapped"] == 0.0
