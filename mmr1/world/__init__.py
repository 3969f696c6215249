"""The synthetic personalization world and the demo: MM-R1 end to end on a CPU.

- ``scene``: subjects (shape x color x pattern x pattern color, 1056), scenes and pair scenes, drawn from tiles
- ``vq``: the world's VQ tokenizer (one code per distinct cell patch: identity round-trips exactly)
- ``tokens``: its tokenizer.json (Chameleon's id layout) and the X-CoT / direct / understanding sequences
- ``identity``: locate and classify subjects; identity and layout of images and reasoning; the identity reward
- ``tasks``: subject splits, prompts, cold-start batches, rewards, evaluation
- ``demo`` (``make demo``) and ``ablation`` (``make ablation``: X-CoT vs direct)

The library (model, generation, rollouts, rewards, trainers) lives in ``mmr1``; nothing there imports this.
"""
from .identity import IdentityJudge, judge_text, parse_subjects
from .scene import (ATTRIBUTES, BACKGROUNDS, CELL, COLORS, GRID, PATTERNS, POSITION_NAMES, SCALES, SHAPES, SIZE,
                    WORLD_VERSION, PairScene, Scene, Subject, all_subjects, cell_grid, pick, placements,
                    random_pair_scene, random_scene, subject_view)
from .tokens import WorldTokens, build_tokenizer, load_world, save_world
from .vq import PatchVQ, default_vq, render

__all__ = ["IdentityJudge", "judge_text", "parse_subjects", "ATTRIBUTES", "BACKGROUNDS", "CELL", "COLORS", "GRID",
           "PATTERNS", "POSITION_NAMES", "SCALES", "SHAPES", "SIZE", "WORLD_VERSION", "PairScene", "Scene", "Subject",
           "all_subjects", "cell_grid", "pick", "placements", "random_pair_scene", "random_scene", "subject_view",
           "WorldTokens", "build_tokenizer", "load_world", "save_world", "PatchVQ", "default_vq", "render"]
