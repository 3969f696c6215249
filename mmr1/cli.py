"""`mmr1` command line: demo, generate, bench.

    mmr1 demo [--out-dir runs/demo]                   the synthetic-world MM-R1 run (SFT -> eval -> GRPO -> eval)
    mmr1 generate --run runs/demo --prompt "my subject big at the left on sky" --reference ref.png
    mmr1 bench [--quick]                              every benchmark, writes BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _generate(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from .demo import xcot_format
    from .generate import SamplingConfig
    from .model import load_transformer
    from .rollout import xcot_rollout
    from .world import SIZE, load_world

    run = Path(args.run)
    for need in (run / "world" / "tokenizer.json", run / args.model / "config.json"):
        if not need.exists():
            raise SystemExit(f"error: {need} not found (run `mmr1 demo --out-dir {run}` first)")
    ref_path = Path(args.reference)
    if not ref_path.exists():
        raise SystemExit(f"error: reference image {ref_path} not found")
    world = load_world(run / "world")
    model = load_transformer(run / args.model)
    ref = torch.from_numpy(np.asarray(Image.open(ref_path).convert("RGB").resize((SIZE, SIZE)))).clone()
    unknown = [w for w in args.prompt.split() if world.text.tok.token_to_id(w) is None]
    if unknown:
        raise SystemExit(f"error: words outside the world's vocabulary: {unknown}")
    ids = [world.bos] + world.text.encode("reference") + world.image_block(ref) + world.text.encode(args.prompt) + \
        [world.end_of_turn]
    fmt = xcot_format(world)
    ro = xcot_rollout(model, [ids], world.image, fmt, SamplingConfig(cfg_scale=args.cfg, top_k=0, text_top_k=0,
                                                                     seed=args.seed))
    print("reasoning:", world.text.decode(ro.reasoning[0]))
    out = Path(args.out)
    imgs = [ref, world.vq.decode(ro.subject_codes)[0], world.vq.decode(ro.final_codes)[0]]
    Image.fromarray(torch.cat(imgs, dim=1).numpy()).resize((SIZE * 3 * 4, SIZE * 4), Image.NEAREST).save(out)
    print(f"wrote {out} (reference | subject image | final image)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="mmr1", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="MM-R1 on the synthetic world: cold-start SFT, GRPO, before/after evaluation")
    d.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m mmr1.demo (see --help there)")
    g = sub.add_parser("generate", help="prompt + reference image -> X-CoT reasoning, subject image, final image")
    g.add_argument("--run", default="runs/demo", help="a demo output directory (world + trained models)")
    g.add_argument("--model", default="grpo", choices=["grpo", "cold_start"])
    g.add_argument("--prompt", required=True, help='e.g. "my subject big at the left on sky"')
    g.add_argument("--reference", required=True, help="reference image of the subject (any size, RGB)")
    g.add_argument("--cfg", type=float, default=2.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="xcot.png")
    b = sub.add_parser("bench", help="every benchmark; writes BENCHMARKS.md")
    b.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from .demo import main as demo_main

        demo_main(args.rest)
    elif args.cmd == "generate":
        _generate(args)
    else:
        subprocess.run([sys.executable, "-m", "bench"] + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    main()
