"""MM-R1 on real checkpoints from the command line: ``mmr1 sft --model ...`` and ``mmr1 grpo --model ...``.

Thin layers over the same SFTTrainer / GRPOTrainer the demo uses:

    torchrun --nproc-per-node 8 -m mmr1.cli sft --model lumina-7b --vqgan chameleon/vqgan.ckpt \\
        --tokenizer lumina-7b/tokenizer.json --data xcot.jsonl --out-dir runs/sft --parallel fsdp
    torchrun --nproc-per-node 8 -m mmr1.cli grpo --model runs/sft/export --vqgan chameleon/vqgan.ckpt \\
        --tokenizer lumina-7b/tokenizer.json --prompts dreambench.jsonl --clip clip-vit-l14 --dino dinov2-base \\
        --rewards format=0.5,clip_t=1,dino=1,psr=1 --out-dir runs/grpo --parallel fsdp

Every SFTConfig / GRPOConfig field is a flag (``--group-size 8``) and can come from a JSON file
(``--config run.json``; flags win). Datasets: mmr1.data (JSONL). Checkpoints: mmr1.sharded_checkpoint
(``<out-dir>/checkpoints``, resumed automatically when present). Rank 0 writes ``<out-dir>/metrics.jsonl``,
shows a progress bar and (GRPO) a grid of the step's final images every ``--sample-every`` steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .data import ImageTokenizer, TurnTokens, XCoTData, load_grpo_prompts, load_sft_examples
from .distributed import finish_distributed, init_distributed
from .generate import SamplingConfig
from .grpo import GRPOConfig, GRPOStep, GRPOTrainer
from .metrics_log import MetricsLog
from .model import JANUS_MODEL_TYPES, load_transformer
from .preemption import PREEMPTED_EXIT, Preempted, SignalFlag, agreed_signal
from .rewards import RewardSet, format_reward
from .sft import SFTConfig, SFTTrainer
from .sharded_checkpoint import latest_checkpoint
from .tokens import ImageVocab, TextTokenizer
from .vqgan import VQConfig, load_vqgan

# what a completion holds: X-CoT (MM-R1: reasoning, a subject image, the final image), reasoning then the image
# (T2I-R1's semantic CoT), the image alone
FORMATS = {"xcot": dict(reasoning=True, subject_image=True), "reasoning": dict(reasoning=True, subject_image=False),
           "direct": dict(reasoning=False, subject_image=False)}
REWARDS = ("format", "clip_t", "pickscore", "clip_i", "dino", "psr", "self", "self_und")


# --------------------------------------------------------------------------- config flags


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _config_fields(cls):
    """(field, default) of a config dataclass, a nested config dataclass's fields in its place (GRPOConfig.sampling:
    --top-k, not --sampling)."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):  # its seed is the run's, derived per step: no flag of its own
            yield from ((g, getattr(default, g.name)) for g in dataclasses.fields(default) if g.name != "seed")
        else:
            yield f, default


def _nested(cls) -> Dict[str, str]:
    """{inner field name: the nested config field holding it}."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            out.update({g.name: f.name for g in dataclasses.fields(default)})
    return out


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field, typed from its default; unset flags stay None (the file / default wins)."""
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f, default in _config_fields(cls):
        if isinstance(default, bool):
            kind = lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]  # noqa: E731
        elif isinstance(default, (dict, list)):
            kind = json.loads
        elif default is None:
            kind = str
        else:
            kind = type(default)
        group.add_argument(_flag(f.name), dest=f"cfg_{f.name}", type=kind, default=None,
                           help=f"default {default!r}")


def config_from_args(cls, args, config_file: Optional[str]):
    values: Dict[str, Any] = {}
    if config_file:
        data = json.loads(Path(config_file).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SystemExit(f"error: {config_file}: unknown {cls.__name__} fields {unknown}")
        values.update(data)
    inner = _nested(cls)
    for f, _ in _config_fields(cls):
        v = getattr(args, f"cfg_{f.name}", None)
        if v is None:
            continue
        if f.name in inner:  # a nested config's field: into that config's dict
            sub = values.setdefault(inner[f.name], {})
            sub = values[inner[f.name]] = dataclasses.asdict(sub) if dataclasses.is_dataclass(sub) else dict(sub)
            sub[f.name] = v
        else:
            values[f.name] = v
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"error: {cls.__name__}: {err}")


def add_model_flags(p: argparse.ArgumentParser, training: bool = True) -> None:
    """The flags naming the model and its tokenizers; ``training``: also the run's (out dir, parallelism, config
    file, checkpoints)."""
    p.add_argument("--model", required=True, help="Lumina-mGPT / Chameleon or Janus-Pro directory (config.json + "
                                                  "weights; the family from config.json's model_type)")
    p.add_argument("--vqgan", default=None, help="Lumina-mGPT / Chameleon: the VQGAN checkpoint (taming .ckpt with the "
                                                 "decoder, or a safetensors directory with model.vqmodel.*; required)."
                                                 " Janus-Pro: default --model's own VQ")
    p.add_argument("--vq-config", default=None, help="VQ config JSON (default: vq_config of --model's config.json)")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer.json (text + IMGIMG image tokens)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the VQ config's)")
    p.add_argument("--resize", action="store_true", help="center-crop and resize images of another size")
    p.add_argument("--cache-dir", default=None, help="image-token cache (default: <out-dir>/token_cache)")
    for field_name, default in dataclasses.asdict(TurnTokens()).items():
        p.add_argument(_flag(field_name + "_token"), default=default, help=f"default {default!r}")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    if not training:
        return
    p.add_argument("--out-dir", required=True)
    p.add_argument("--parallel", choices=["none", "ddp", "fsdp"], default=None,
                   help="default: ddp under torchrun with > 1 process, else none")
    p.add_argument("--config", default=None, help="JSON file of config fields (flags override it)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: only the last)")
    p.add_argument("--keep-last", type=int, default=3)


class Parts:
    """The model, its tokenizers and the dataset builder, loaded from the flags; the family (Chameleon /
    Lumina-mGPT or Janus-Pro) from --model's config.json."""

    def __init__(self, args):
        for need, what in ((args.model, "--model"), (args.tokenizer, "--tokenizer")):
            if not Path(need).exists():
                raise SystemExit(f"error: {what} {need} not found")
        if not (Path(args.model) / "config.json").exists():
            raise SystemExit(f"error: --model {args.model} has no config.json")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, args.dtype)
        kind = json.loads((Path(args.model) / "config.json").read_text()).get("model_type")
        self.janus = kind in JANUS_MODEL_TYPES
        self.text = TextTokenizer(args.tokenizer)
        try:
            (self._janus if self.janus else self._lumina)(args)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"error: {err}")
        side = self.resolution // self.downsample
        self.image_hw = (side, side)
        out_dir = getattr(args, "out_dir", None)
        cache = args.cache_dir or (str(Path(out_dir) / "token_cache") if out_dir else None)
        images = ImageTokenizer(self.vq, self.vocab, self.resolution, cache, resize=args.resize, device=self.device)
        references = None
        if self.janus:  # reference images through the understanding path (SigLIP loaded at the first one)
            from .janus import JanusReferenceImages, load_janus_understanding

            references = JanusReferenceImages(
                self.model, lambda: load_janus_understanding(args.model, self.dtype).to(self.device), images.pixels)
        turn = TurnTokens(args.bos_token, args.end_of_turn_token, args.think_open_token, args.think_close_token)
        try:
            self.data = XCoTData(self.text, images, turn, max_seq_len=self.model.config.max_seq_len,
                                 references=references)
        except ValueError as err:
            raise SystemExit(f"error: {err} (set it with --{{bos,end-of-turn,think-open,think-close}}-token)")

    def _lumina(self, args) -> None:
        if not args.vqgan:
            raise SystemExit(f"error: --vqgan is required for a Chameleon / Lumina-mGPT checkpoint ({args.model})")
        if not Path(args.vqgan).exists():
            raise SystemExit(f"error: --vqgan {args.vqgan} not found")
        self.model = load_transformer(args.model, dtype=self.dtype).to(self.device).train()
        if args.vq_config:
            vq_cfg = VQConfig.from_dict(json.loads(Path(args.vq_config).read_text()))
        else:
            hf = json.loads((Path(args.model) / "config.json").read_text())
            if "vq_config" not in hf:
                raise SystemExit(f"error: {args.model}/config.json has no vq_config; pass --vq-config")
            vq_cfg = VQConfig.from_dict(hf["vq_config"])
        self.vq = load_vqgan(args.vqgan, vq_cfg, device=self.device)
        if self.vq.decoder is None:
            raise SystemExit(f"error: {args.vqgan} has no VQ decoder; the image rewards need one (use the taming "
                             "vqgan.ckpt that ships with Chameleon / Lumina-mGPT)")
        self.vocab = ImageVocab.from_tokenizer_json(args.tokenizer)
        if self.vocab.num_codes != vq_cfg.num_embeddings:
            raise SystemExit(f"error: the tokenizer has {self.vocab.num_codes} image codes, the VQGAN "
                             f"{vq_cfg.num_embeddings}")
        self.resolution, self.downsample = args.resolution or vq_cfg.resolution, vq_cfg.downsample
        lo, hi = self.vocab.window
        self.text_range = (hi, self.text.vocab_size)  # Lumina's text ids follow its image codes

    def _janus(self, args) -> None:
        from .janus import load_janus, load_janus_vq

        if args.vq_config:
            raise SystemExit("error: --vq-config is for Chameleon / Lumina-mGPT; a Janus-Pro VQ reads its "
                             "checkpoint's config.json")
        self.model = load_janus(args.model, dtype=self.dtype).to(self.device).train()
        # the image-structure ids as the tokenizer names them (transformers' config.json does not hold them)
        for field_name, name in (("boi_id", "<begin_of_image>"), ("eoi_id", "<end_of_image>")):
            try:
                setattr(self.model.janus, field_name, self.text.token_id(name))
            except KeyError:
                pass
        self.vq = load_janus_vq(args.vqgan or args.model).to(self.device)  # --vqgan: another Janus directory
        self.vocab = self.model.image_vocab()
        if self.vocab.num_codes != self.vq.vq.config.num_embeddings:
            raise SystemExit(f"error: the model's image head has {self.vocab.num_codes} codes, the VQ "
                             f"{self.vq.vq.config.num_embeddings}")
        size = self.model.janus.image_size
        if args.resolution not in (None, size):
            raise SystemExit(f"error: --resolution {args.resolution}: this Janus-Pro checkpoint draws {size} px images")
        self.resolution, self.downsample = size, size // self.vq.side  # 384 px, 24 x 24 codes for Janus-Pro
        self.text_range = (0, min(self.text.vocab_size, self.model.text_vocab))  # text ids come first


def _parallel(args, world: int) -> str:
    if args.parallel is not None:
        if args.parallel != "none" and world == 1 and not dist.is_initialized():
            raise SystemExit(f"error: --parallel {args.parallel} needs torchrun (e.g. torchrun --nproc-per-node 2 "
                             "-m mmr1.cli ...)")
        return args.parallel
    return "ddp" if world > 1 else "none"


def _setup_distributed():
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return init_distributed()
    return 0, 1


# --------------------------------------------------------------------------- sft


def _start(args, config_cls):
    """(rank, world, config, parts, out dir): what both commands begin with."""
    rank, world = _setup_distributed()
    cfg = config_from_args(config_cls, args, args.config)
    parts = Parts(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return rank, world, cfg, parts, out


def sft_main(args) -> None:
    rank, world, cfg, parts, out = _start(args, SFTConfig)
    try:
        seqs, plens, weights = load_sft_examples(args.data, parts.data, reasoning_weight=args.reasoning_weight,
                                                 **FORMATS[args.format])
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    if cfg.batch_size % world:
        raise SystemExit(f"error: batch_size={cfg.batch_size} must be divisible by the {world} processes")
    trainer = SFTTrainer(parts.model, cfg, parallel=_parallel(args, world))
    ckpt = out / "checkpoints"
    if latest_checkpoint(ckpt) is not None:
        trainer.load(ckpt)
    log = MetricsLog(out / "metrics.jsonl", rank)
    from tqdm import tqdm

    per = cfg.batch_size // world
    save = lambda: trainer.save(ckpt, args.keep_last, extra={"data_position": trainer.step_idx * cfg.batch_size})  # noqa: E731
    with SignalFlag() as flag:  # preemption as in mmr1 grpo: finish the step, checkpoint it, exit PREEMPTED_EXIT
        for _ in tqdm(range(trainer.step_idx, cfg.steps), desc="sft", disable=rank != 0):
            step = trainer.step_idx
            idx = sft_batch_indices(len(seqs), cfg.batch_size, step, cfg.seed)[rank * per:(rank + 1) * per]
            t0 = time.perf_counter()
            m = trainer.step([seqs[i] for i in idx], [plens[i] for i in idx], [weights[i] for i in idx])
            log.write({"step": step, **m, "time_s": time.perf_counter() - t0})
            saved = bool(args.checkpoint_every and trainer.step_idx % args.checkpoint_every == 0)
            if saved:
                save()
            signum = agreed_signal(flag.signum)
            if signum:
                if not saved:
                    save()
                _exit_preempted("sft", rank, Preempted(trainer.step_idx, signum, str(ckpt)))
    if args.checkpoint_every == 0 or trainer.step_idx % args.checkpoint_every:
        save()
    _finish(rank)


def sft_batch_indices(n: int, batch_size: int, step: int, seed: int) -> List[int]:
    """The global batch of ``step``: consecutive slices of a per-epoch seeded permutation (the data position is
    step x batch_size, so a resume continues where the run stopped)."""
    out: List[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = perm[offset:offset + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


# --------------------------------------------------------------------------- grpo


def parse_reward_weights(spec: str) -> Dict[str, float]:
    weights = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in REWARDS:
            raise SystemExit(f"error: --rewards: unknown reward {name!r} (one of {', '.join(REWARDS)})")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise SystemExit(f"error: --rewards: {item!r} is not name=weight") from None
    if not weights:
        raise SystemExit("error: --rewards names no reward")
    return weights


def build_rewards(args, parts: Parts, fmt, weights: Dict[str, float]) -> RewardSet:
    """The reward set: format, CLIP-T, PickScore-style, CLIP-I, DINO, PSR (per-subject crops, multi-subject
    prompts), the dual self-reward (self: generation direction, self_und: understanding direction); each vision
    model from a local directory."""
    from .rewards.self_reward import generation_self_reward, understanding_self_reward
    from .rewards.vision import CLIPScorer, DINOScorer, SubjectLocator, psr_subject_consistency

    need = {"clip_t": "clip", "clip_i": "clip", "pickscore": "pickscore", "dino": "dino", "psr": "dino"}
    for name, flag in need.items():
        if name in weights and not getattr(args, flag):
            raise SystemExit(f"error: reward {name!r} needs --{flag} (a local model directory)")
    dev = parts.device
    clip = CLIPScorer(args.clip, dev) if args.clip else None
    pick = CLIPScorer(args.pickscore, dev) if args.pickscore else None
    dino = DINOScorer(args.dino, dev) if args.dino else None
    locator = SubjectLocator(args.detector, dev) if "psr" in weights else None
    ids = parts.data.ids

    def mean_over_refs(score, ro, batch):
        return torch.stack([torch.stack([score(ro.final_images[i:i + 1], ref[None])[0] for ref in b["references"]])
                            .mean() for i, b in enumerate(batch)])

    fns = {
        "format": lambda ro, b: format_reward(ro, parts.vocab, fmt),
        "clip_t": lambda ro, b: (clip.text_alignment(ro.final_images, [x["prompt"] for x in b]), {}),
        "pickscore": lambda ro, b: (pick.preference_score(ro.final_images, [x["prompt"] for x in b]), {}),
        "clip_i": lambda ro, b: (mean_over_refs(clip.image_similarity, ro, b), {}),
        "dino": lambda ro, b: (mean_over_refs(dino.similarity, ro, b), {}),
        "psr": lambda ro, b: psr_subject_consistency(
            dino, locator, ro.final_images, [list(x["references"]) for x in b],
            [x["classes"] or ["subject"] * len(x["references"]) for x in b]),
        # the dual self-reward (MM-R1): the policy's own log p(prompt | its image) and log p(its image | prompt)
        "self": lambda ro, b: generation_self_reward(
            parts.model, [parts.vocab.encode_block(c).tolist() for c in ro.final_codes],
            [parts.text.encode(x["prompt"]) for x in b], prefix=[], sep=ids["end_of_turn"], bos=ids["bos"]),
        "self_und": lambda ro, b: understanding_self_reward(
            parts.model, [parts.text.encode(x["prompt"]) for x in b], ro.final_codes, parts.vocab,
            sep=ids["end_of_turn"], bos=ids["bos"]),
    }
    rs = RewardSet({k: fns[k] for k in weights}, dict(weights))
    rs.vq_decode = parts.vq.decode  # the trainer's rollouts decode the final images for the vision rewards
    return rs


def save_grid(images: torch.Tensor, path: Path, columns: int) -> None:
    """[N, 3, H, W] in [-1, 1] -> one PNG, ``columns`` images per row (a group per row)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.zeros(3, rows * h, columns * w)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img.float().clamp(-1, 1)
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def grpo_main(args) -> None:
    rank, world, cfg, parts, out = _start(args, GRPOConfig)
    fmt = completion_format(args, parts)
    budget = completion_budget(fmt, parts.vocab)
    prompts = load_grpo_prompts(args.prompts, parts.data, completion_budget=budget)
    weights = parse_reward_weights(args.rewards)
    by_reference = sorted({"clip_i", "dino", "psr"} & set(weights))
    bare = [p["id"] for p in prompts if len(p["references"]) == 0]
    if by_reference and bare:
        raise SystemExit(f"error: rewards {by_reference} compare with reference images; prompts {bare[:5]} have none")
    rewards = build_rewards(args, parts, fmt, weights)
    # the trainer appends every step's metrics to log_path on rank 0 (default <out-dir>/metrics.jsonl)
    cfg = dataclasses.replace(cfg, log_path=cfg.log_path or str(out / "metrics.jsonl"))
    trainer = GRPOTrainer(parts.model, parts.vocab, fmt, rewards, prompts, cfg, parallel=_parallel(args, world))
    ckpt = out / "checkpoints"
    if latest_checkpoint(ckpt) is not None:
        trainer.load(ckpt)
    grids = out / "samples"
    grids.mkdir(exist_ok=True)

    def sample_grid(tr: GRPOTrainer, result: GRPOStep) -> None:  # the step's final images, a group per row
        ro = result.rollout
        if rank == 0 and args.sample_every and tr.step_idx % args.sample_every == 0 and ro.final_images is not None:
            save_grid(ro.final_images, grids / f"step-{tr.step_idx:06d}.png", cfg.group_size)

    try:
        trainer.train(progress=rank == 0, checkpoint_dir=ckpt, checkpoint_every=args.checkpoint_every,
                      keep_last=args.keep_last, callbacks=[sample_grid], handle_signals=True)
    except Preempted as stop:  # the checkpoint of the last finished step is written: exit for a rerun to resume
        _exit_preempted("grpo", rank, stop)
    if args.checkpoint_every == 0 or trainer.step_idx % args.checkpoint_every:
        trainer.save(ckpt, args.keep_last)
    _finish(rank)


def completion_format(args, parts: Parts):
    text_range = tuple(args.text_range) if args.text_range else parts.text_range
    return parts.data.xcot_format(parts.image_hw, text_range, args.max_reasoning_tokens, **FORMATS[args.format])


def completion_budget(fmt, vocab: ImageVocab) -> int:
    """The most tokens a rollout appends to a prompt in this format."""
    text = 2 + fmt.max_text_tokens if fmt.reasoning else 0
    subject = vocab.block_length(*fmt.subject_hw) if fmt.subject_image else 0
    return text + subject + vocab.block_length(*fmt.final_hw) + 1


def generate_main(args) -> None:
    """`mmr1 generate --model DIR ...`: one prompt (and its reference images) -> the completion's reasoning on
    stdout, its images (a row per sample: [subject image,] final image) in one PNG."""
    from .rollout import xcot_rollout

    if args.num_samples < 1:
        raise SystemExit(f"error: --num-samples must be >= 1, got {args.num_samples}")
    parts = Parts(args)
    fmt = completion_format(args, parts)
    rec = {"references": [str(Path(r).resolve()) for r in args.reference], "prompt": args.prompt}
    try:
        ids = parts.data.prompt_ids(rec, Path.cwd(), "")
        parts.data.check_length(len(ids) + completion_budget(fmt, parts.vocab), "", "the prompt plus its completion")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    scfg = config_from_args(SamplingConfig, args, None)
    model = parts.model.eval()
    with torch.no_grad():
        ro = xcot_rollout(model, [ids], parts.vocab, fmt, scfg, num_samples=args.num_samples,
                          vq_decode=parts.vq.decode)
    if fmt.reasoning:
        for i in range(args.num_samples):
            print(f"[{i}] reasoning:", parts.text.decode(ro.reasoning[i]))
    images = ro.final_images if ro.subject_images is None else \
        torch.stack([ro.subject_images, ro.final_images], 1).flatten(0, 1)
    save_grid(images, Path(args.out), 1 if ro.subject_images is None else 2)
    print(f"wrote {args.out} ({args.num_samples} sample(s): {'subject image | ' if fmt.subject_image else ''}"
          f"final image)")


def _exit_preempted(command: str, rank: int, stop: Preempted) -> None:
    """After a preemption's checkpoint: say so (rank 0) and exit PREEMPTED_EXIT on every rank (the same command
    resumes)."""
    if rank == 0:
        print(f"mmr1 {command}: {stop}", file=sys.stderr, flush=True)
    finish_distributed(PREEMPTED_EXIT)
    sys.exit(PREEMPTED_EXIT)


def _finish(rank: int) -> None:
    finish_distributed()  # under torchrun: barrier, destroy, exit now (see mmr1.distributed.finish_distributed)


# --------------------------------------------------------------------------- parsers


def real_sft_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmr1 sft", description="cold-start SFT of a real checkpoint on X-CoT JSONL")
    add_model_flags(p)
    p.add_argument("--data", required=True, help="X-CoT examples, JSONL (mmr1.data)")
    p.add_argument("--reasoning-weight", type=float, default=1.0, help="SFT loss weight of the reasoning tokens")
    p.add_argument("--format", choices=sorted(FORMATS), default="xcot",
                   help="the examples' completion: xcot (reasoning, subject_image, final_image), reasoning "
                        "(reasoning, final_image), direct (final_image)")
    add_config_flags(p, SFTConfig)
    return p


def real_grpo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmr1 grpo", description="GRPO of a real checkpoint on JSONL prompts")
    add_model_flags(p)
    p.add_argument("--prompts", required=True, help="GRPO prompts, JSONL (mmr1.data; `mmr1 convert-dreambench`)")
    p.add_argument("--rewards", default="format=0.5,clip_t=1,dino=1",
                   help=f"name=weight,... from {', '.join(REWARDS)}")
    p.add_argument("--clip", default=None, help="local CLIPModel directory (clip_t, clip_i)")
    p.add_argument("--pickscore", default=None, help="local PickScore (CLIPModel) directory")
    p.add_argument("--dino", default=None, help="local DINO / DINOv2 directory (dino, psr)")
    p.add_argument("--detector", default=None, help="local Grounding-DINO directory for PSR crops (default: "
                                                     "whole image)")
    add_format_flags(p)
    p.add_argument("--sample-every", type=int, default=0, help="save a grid of the step's final images every K "
                                                                "steps (0: never)")
    add_config_flags(p, GRPOConfig)
    return p


def add_format_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=sorted(FORMATS), default="xcot",
                   help="the completion: xcot (reasoning, subject image, final image: MM-R1), reasoning (reasoning, "
                        "final image: T2I-R1), direct (the final image)")
    p.add_argument("--max-reasoning-tokens", type=int, default=128)
    p.add_argument("--text-range", type=int, nargs=2, default=None,
                   help="ids the reasoning is sampled from (default: every text id -- Lumina-mGPT: from the end of "
                        "the image window to the text vocab's end; Janus-Pro: from 0 to the text vocab's end)")


def real_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmr1 generate", description="a real checkpoint's completion for one prompt")
    add_model_flags(p, training=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--reference", action="append", default=[], help="a reference image (repeat for several)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--out", default="generated.png")
    add_format_flags(p)
    add_config_flags(p, SamplingConfig)
    return p


__all__ = ["sft_main", "grpo_main", "generate_main", "real_generate_parser", "real_sft_parser", "real_grpo_parser", "sft_batch_indices",
           "parse_reward_weights", "add_config_flags", "config_from_args"]
