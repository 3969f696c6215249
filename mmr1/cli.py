"""`mmr1` command line: demo, sft, grpo, generate, eval, bench.

    mmr1 demo [--out-dir runs/demo]                   the synthetic-world MM-R1 run (cold start -> eval -> GRPO -> eval)
    mmr1 ablation                                     X-CoT vs direct on the synthetic world (make ablation)
    mmr1 sft --out-dir runs/sft [--steps N]           only the world + cold-start SFT (what `make cold-start` ships)
    mmr1 grpo --cold-start runs/sft/cold_start --out-dir runs/grpo [--steps N]
    mmr1 generate --run runs/demo --prompt "my subject big at the left on sky" --reference ref.png
    mmr1 generate --run runs/demo --prompt "my first subject at the left and my second subject at the right on sky"
                  --reference a.png --reference b.png
    mmr1 eval --dreambench tests/data/dreambench --generated gen/ --clip models/clip --dino models/dino
    mmr1 bench [--quick]                              every benchmark, writes BENCHMARKS.md

Real checkpoints (mmr1.recipe; under torchrun: torchrun --nproc-per-node N -m mmr1.cli sft|grpo ...):
    mmr1 sft --model DIR --vqgan CKPT --tokenizer JSON --data FILE.jsonl --out-dir runs/sft [--parallel fsdp]
    mmr1 grpo --model DIR --vqgan CKPT --tokenizer JSON --prompts FILE.jsonl --clip DIR --dino DIR
              [--detector DIR] [--rewards format=0.5,clip_t=1,dino=1,psr=1] --out-dir runs/grpo
    mmr1 generate --model DIR --tokenizer JSON --prompt "a sks dog on the beach" [--reference dog.jpg]
                  [--format xcot|reasoning|direct] [--cfg-scale 5] --out out.png
    mmr1 convert-dreambench tests/data/dreambench prompts.jsonl [--references 1]
    mmr1 export runs/grpo/checkpoints out_dir [--base DIR]   consolidated weights (mmr1.model.load_model); a
                                                       Janus-Pro run writes into --base's layout (the directory
                                                       it started from)

--model may be a Chameleon / Lumina-mGPT or a Janus-Pro directory (transformers' or DeepSeek's layout; the family
from config.json). Janus-Pro reads reference images through its understanding path and draws with its own VQ.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _demo_sampling(args):
    """The demo's sampling settings (DemoConfig.sampling), with this command's seed and CFG scale if given."""
    from dataclasses import replace

    from .world.demo import DemoConfig

    base = DemoConfig().sampling
    return replace(base, seed=args.seed, cfg_scale=base.cfg_scale if args.cfg is None else args.cfg)


def _generate(args) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from .model import load_transformer
    from .rollout import xcot_rollout
    from .world import SIZE, load_world
    from .world.identity import parse_subjects
    from .world.tasks import xcot_format

    run = Path(args.run)
    for need in (run / "world" / "tokenizer.json", run / args.model / "config.json"):
        if not need.exists():
            raise SystemExit(f"error: {need} not found (run `mmr1 demo --out-dir {run}` first)")
    need_refs = 2 if "second subject" in args.prompt else 1
    if len(args.reference) != need_refs:
        raise SystemExit(f"error: the prompt names {need_refs} subject(s); give --reference {need_refs} time(s), "
                         f"got {len(args.reference)}")
    refs = []
    for ref_path in map(Path, args.reference):
        if not ref_path.exists():
            raise SystemExit(f"error: reference image {ref_path} not found")
        img = np.array(Image.open(ref_path).convert("RGB").resize((SIZE, SIZE)))  # a writable copy
        refs.append(torch.from_numpy(img))
    world = load_world(run / "world")
    model = load_transformer(run / args.model)
    unknown = [w for w in args.prompt.split() if world.text.tok.token_to_id(w) is None]
    if unknown:
        raise SystemExit(f"error: words outside the world's vocabulary: {unknown}")
    ids = [world.bos]
    for ref in refs:
        ids += world.text.encode("reference") + world.image_block(ref)
    ids += world.text.encode(args.prompt) + [world.end_of_turn]
    fmt = xcot_format(world)
    ro = xcot_rollout(model, [ids], world.image, fmt, _demo_sampling(args))
    text = world.text.decode(ro.reasoning[0])
    print("reasoning:", text)
    print("names:", ", ".join(s.words() if s else "(unreadable)" for s in parse_subjects(text)) or "(nothing)")
    out = Path(args.out)
    imgs = refs + [world.vq.decode(ro.subject_codes)[0], world.vq.decode(ro.final_codes)[0]]
    strip = torch.cat(imgs, dim=1).numpy()
    Image.fromarray(strip).resize((strip.shape[1] * 4, SIZE * 4), Image.NEAREST).save(out)
    print(f"wrote {out} (reference(s) | subject image | final image)")


MODES = {
    "sft": ("Two modes. Without --model: the synthetic world's cold start (the demo's tiny model; what `make "
            "cold-start` ships) with the options below. With --model: SFT of a real Chameleon / Lumina-mGPT or "
            "Janus-Pro checkpoint on a JSONL dataset, under torchrun for several processes -- its options follow."),
    "generate": ("Two modes. With --run (and --model grpo|cold_start): a demo run's model on the synthetic world "
                 "(the options below). With --model <checkpoint directory>: a real Chameleon / Lumina-mGPT or "
                 "Janus-Pro checkpoint -- its options follow."),
    "grpo": ("Two modes. Without --model: GRPO of the synthetic world's cold start with before/after evaluation "
             "(the options below). With --model: GRPO of a real Chameleon / Lumina-mGPT or Janus-Pro checkpoint "
             "with CLIP / DINO rewards, under torchrun for several processes -- its options follow."),
}


def _real_help(cmd: str) -> str:
    """The real-checkpoint parser's help, shown under the synthetic one (`mmr1 sft|grpo --help`)."""
    from . import recipe

    parser = {"sft": recipe.real_sft_parser, "grpo": recipe.real_grpo_parser,
              "generate": recipe.real_generate_parser}[cmd]()
    parser.prog = f"mmr1 {cmd}"
    return f"with --model (real checkpoints):\n\n{parser.format_help()}"


def _real_model(args) -> bool:
    """--model names a checkpoint directory (not the demo's `mmr1 generate --model grpo|cold_start`)."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--model=") else (args[i + 1] if a == "--model" and
                                                                      i + 1 < len(args) else None)
        if value is not None:
            return value not in ("grpo", "cold_start")
    return False


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["sft"], ["grpo"], ["generate"]) and _real_model(argv[1:]):
        from . import recipe

        parser, entry = {"sft": (recipe.real_sft_parser, recipe.sft_main),
                         "grpo": (recipe.real_grpo_parser, recipe.grpo_main),
                         "generate": (recipe.real_generate_parser, recipe.generate_main)}[argv[0]]
        return entry(parser().parse_args(argv[1:]))
    ap = argparse.ArgumentParser(prog="mmr1", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="MM-R1 on the synthetic world: cold-start SFT, GRPO, before/after evaluation")
    d.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m mmr1.world.demo (see --help there)")
    a = sub.add_parser("ablation", help="X-CoT vs direct: same model, cold-start and GRPO budgets (about an hour)")
    a.add_argument("rest", nargs=argparse.REMAINDER, help="options of python -m mmr1.world.ablation")
    wants_help = any(a in ("-h", "--help") for a in argv[1:])

    def modes(cmd):  # description and (only when --help is asked: it imports the recipe) the real mode's options
        return dict(description=MODES[cmd], formatter_class=argparse.RawDescriptionHelpFormatter,
                    epilog=_real_help(cmd) if argv[:1] == [cmd] and wants_help else None)

    g = sub.add_parser("generate", help="prompt + reference image -> X-CoT reasoning, subject image, final image",
                       **modes("generate"))
    g.add_argument("--run", default="runs/demo", help="a demo output directory (world + trained models)")
    g.add_argument("--model", default="grpo", choices=["grpo", "cold_start"])
    g.add_argument("--prompt", required=True, help='e.g. "my subject big at the left on sky"')
    g.add_argument("--reference", required=True, action="append",
                   help="reference image of the subject (any size, RGB); twice for a two-subject prompt "
                        '("my first subject at the left and my second subject at the right on sky")')
    g.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the demo's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default="xcot.png")
    s_ = sub.add_parser("sft", help="cold-start SFT: the synthetic world's tiny model, or a real checkpoint (--model)",
                        **modes("sft"))
    s_.add_argument("--out-dir", default="runs/sft")
    s_.add_argument("--steps", type=int, default=None, help="SFT steps (default: the demo's)")
    s_.add_argument("--seed", type=int, default=0)
    s_.add_argument("--eval-every", type=int, default=0,
                    help="log held-out identity every N steps (64 + 32 prompts, ~10 s each; 0 = never)")
    s_.add_argument("--direct", action="store_true",
                    help="the ablation's direct policy (references + prompt -> final image; `make ablation` uses it "
                         "with --direct-cold-start)")
    s_.add_argument("--clean-data", action="store_true",
                    help="train on a perfect data pipeline (no identity mixing, wrong sides, dropped patterns or "
                         "caption errors; see mmr1/world/pipeline.py)")
    r = sub.add_parser("grpo", help="GRPO: the synthetic world's cold start, or a real checkpoint (--model)",
                       **modes("grpo"))
    r.add_argument("--cold-start", required=True, help="a model directory written by `mmr1 sft` or `mmr1 demo`")
    r.add_argument("--out-dir", default="runs/grpo")
    r.add_argument("--steps", type=int, default=None, help="GRPO steps (default: the demo's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eval-prompts", type=int, default=None,
                   help="held-out one-subject prompts evaluated before and after (default: the demo's 200)")
    r.add_argument("--eval-pair-prompts", type=int, default=None,
                   help="held-out two-subject prompts evaluated before and after (default: the demo's 100)")
    r.add_argument("--eval-every", type=int, default=None,
                   help="held-out identity during GRPO every N steps (default: the demo's 8; 0 = never)")
    r.add_argument("--monitor-prompts", type=int, default=None,
                   help="prompts of each kind in that during-training check (default: the demo's 32)")
    r.add_argument("--compare-steps", type=int, default=None,
                   help="GRPO steps timed per path for the fused-vs-reference table (default: the demo's 2; 0 = skip)")
    e = sub.add_parser("eval", help="DreamBench DINO / CLIP-I / CLIP-T of generated images (local model dirs)")
    e.add_argument("--dreambench", required=True, help="the benchmark directory (subject folders + prompts)")
    e.add_argument("--generated", required=True, help="<dir>/<subject>/<prompt index>_*.png")
    e.add_argument("--clip", required=True, help="a local transformers CLIPModel directory")
    e.add_argument("--dino", required=True, help="a local transformers ViT (DINO) directory")
    e.add_argument("--out", default=None, help="write the full result as JSON here")
    b = sub.add_parser("bench", help="every benchmark; writes BENCHMARKS.md")
    b.add_argument("--quick", action="store_true")
    x = sub.add_parser("export", help="a training checkpoint -> consolidated HF-layout safetensors directory")
    x.add_argument("checkpoint", help="a checkpoint root (its latest) or one step directory")
    x.add_argument("out", help="output directory (config.json + model.safetensors)")
    x.add_argument("--base", default=None, help="Janus-Pro: the checkpoint directory the run started from; the "
                                                "export is that directory with the trained weights")
    c = sub.add_parser("convert-dreambench", help="DreamBench-layout directory -> GRPO prompts JSONL")
    c.add_argument("root", help="subject folders + prompts_and_classes.txt")
    c.add_argument("out", help="the JSONL file to write")
    c.add_argument("--references", type=int, default=1, help="reference photos per prompt")
    c.add_argument("--prompts-per-subject", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "export":
        from .sharded_checkpoint import export_consolidated

        try:
            print(f"wrote {export_consolidated(args.checkpoint, args.out, base=args.base)}")
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}")
        return
    if args.cmd == "convert-dreambench":
        from .data import dreambench_to_jsonl

        try:
            n = dreambench_to_jsonl(args.root, args.out, args.references, args.prompts_per_subject)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}")
        print(f"wrote {n} prompts to {args.out}")
        return
    if args.cmd == "demo":
        from .world.demo import main as demo_main

        demo_main(args.rest)
    elif args.cmd == "ablation":
        from .world.ablation import main as ablation_main

        ablation_main(args.rest)
    elif args.cmd == "sft":
        from .world.demo import DemoConfig, run_sft_only

        steps = DemoConfig.sft_steps if args.steps is None else args.steps
        from .world.pipeline import DataFlaws

        flaws = DataFlaws.clean() if args.clean_data else DataFlaws()
        run_sft_only(DemoConfig(out_dir=args.out_dir, sft_steps=steps, seed=args.seed, flaws=flaws,
                                direct=args.direct), eval_every=args.eval_every)
    elif args.cmd == "grpo":
        from .world.demo import DemoConfig, run

        if not (Path(args.cold_start) / "config.json").exists():
            raise SystemExit(f"error: no model at {args.cold_start} (expected config.json + model.safetensors)")
        given = {"grpo_steps": ("--steps", args.steps), "eval_prompts": ("--eval-prompts", args.eval_prompts),
                 "eval_pair_prompts": ("--eval-pair-prompts", args.eval_pair_prompts),
                 "grpo_eval_every": ("--eval-every", args.eval_every),
                 "grpo_eval_prompts": ("--monitor-prompts", args.monitor_prompts),
                 "compare_steps": ("--compare-steps", args.compare_steps)}
        for flag, value in given.values():
            if value is not None and value < 0:
                raise SystemExit(f"error: {flag} must be >= 0, got {value}")
        run(DemoConfig(out_dir=args.out_dir, seed=args.seed,
                       **{k: v for k, (_, v) in given.items() if v is not None}),
            args.cold_start)
    elif args.cmd == "eval":
        import json

        from .dreambench import evaluate

        try:
            res = evaluate(args.dreambench, args.generated, args.clip, args.dino)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}")
        print(" ".join(f"{k} {v:.4f}" for k, v in res["summary"].items()), f"({res['images']} images)")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    elif args.cmd == "generate":
        _generate(args)
    else:
        subprocess.run([sys.executable, "-m", "bench"] + (["--quick"] if args.quick else []), check=True)


if __name__ == "__main__":
    main()
