"""Benchmark: TRL 1.16's GRPOTrainer with and without mmr1's kernels (mmr1_kernels.trl.use_mmr1_kernels).

    python -m bench.trl_trainer [--quick] [--repeats N]

A Qwen2-shaped causal LM with a small backbone (2 layers, d 256) and a real vocabulary -- 151,936 (Qwen2) and
65,536 (Chameleon / Lumina) -- so that the LM head and its [B, T, V] logits are what costs: B x T = 4 x 512
completion tokens (the logits alone would be 2048 x 151,936 x 4 B = 1.24 GB in fp32; sized so that the full run
takes ~30 min on 2 CPU cores -- TRL's path takes ~10 s per loss + backward there). Two trainers from the same
checkpoint and seed, TRL's own (its fused chunked log-prob head, ``_ChunkedLogProbFunction``, and its
``_compute_loss``) and the same trainer after ``use_mmr1_kernels`` (``fused_linear_logprobs`` + ``policy_loss``):

1. the log-prob + loss phase: ``trainer.compute_loss`` + backward (``training_step`` less the generation) on one
   prepared batch (the policy's log-probs and entropies,
   the loss with beta 0.04 against given reference log-probs, the backward) -- median time and peak extra memory;
2. the reference model's log-probs for the batch (no grad), as TRL computes them before the update;
3. (full run, fp32) one whole ``trainer.train()`` step: generation of the 4 x 512 tokens by TRL, rewards, the
   reference pass and the update.
fp32 and bf16 weights; TRL's default loss (dapo); the two losses are checked equal on every batch.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .common import (DEVICE, Row, ensure_bench_env, format_table, machine_info, peak_extra_mib, save_rows,
                     summarize, time_providers)

OURS, TRL = "TRL + mmr1 kernels", "TRL 1.16 (fused chunked head)"


def _tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def _checkpoint(root: Path, vocab: int, dtype: torch.dtype) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = root / f"qwen2-v{vocab}-{str(dtype).split('.')[1]}"
    if path.exists():
        return path
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).to(dtype).save_pretrained(path)
    _tokenizer(vocab).save_pretrained(path)
    return path


def _reward(completions, **_):
    return [float(sum(int(w[1:]) % 3 == 0 for w in c.split() if w.startswith("w"))) for c in completions]


def _trainer(path: Path, T: int, B: int, dtype: torch.dtype, out: Path, patched: bool, steps: int = 1):
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from mmr1_kernels.trl import use_mmr1_kernels

    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(f"w{i + j}" for j in range(8)) for i in range(64)]})
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=B, num_generations=B, max_completion_length=T,
                      max_steps=steps, logging_steps=1, report_to=[], use_cpu=DEVICE.type == "cpu", beta=0.04,
                      save_strategy="no", seed=0, log_completions=False, bf16=False, learning_rate=1e-5,
                      model_init_kwargs={"dtype": dtype})
    tr = GRPOTrainer(model=str(path), reward_funcs=_reward, args=args, train_dataset=prompts,
                     processing_class=_tokenizer(int(path.name.split("-v")[1].split("-")[0])))
    return use_mmr1_kernels(tr) if patched else tr


def _batch(vocab: int, B: int, T: int, P: int = 16):
    g = torch.Generator().manual_seed(1)
    dev = DEVICE
    return {
        "prompt_ids": torch.randint(4, vocab, (B, P), generator=g).to(dev),
        "prompt_mask": torch.ones(B, P, dtype=torch.long, device=dev),
        "completion_ids": torch.randint(4, vocab, (B, T), generator=g).to(dev),
        "completion_mask": torch.ones(B, T, dtype=torch.long, device=dev),
        "advantages": torch.randn(B, generator=g).to(dev),
        "ref_per_token_logps": (-torch.rand(B, T, generator=g) * 12).to(dev),
        "num_items_in_batch": torch.tensor(float(B * T), device=dev),
    }


def bench_phase(vocab: int, dtype: torch.dtype, B: int, T: int, repeats: int, root: Path) -> List[Row]:
    path = _checkpoint(root, vocab, dtype)
    trainers = {TRL: _trainer(path, T, B, dtype, root / "o1", False), OURS: _trainer(path, T, B, dtype, root / "o2", True)}
    batch = _batch(vocab, B, T)
    losses = {}

    def step(tr):
        def run():  # Trainer.training_step after _prepare_inputs (which would generate): loss, then backward
            tr.model.train()
            with tr.compute_loss_context_manager():
                loss = tr.compute_loss(tr.model, dict(batch))
            tr.accelerator.backward(loss)
            losses[tr] = float(loss.detach())
            tr.model.zero_grad(set_to_none=True)
        return run

    def ref(tr):
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)

        def run():
            with torch.no_grad():
                return tr._get_per_token_logps_and_entropies(tr.ref_model, ids, am, T)[0]
        return run

    for tr in trainers.values():  # what Trainer's loop sets before each micro-batch (one here: no accumulation)
        tr.current_gradient_accumulation_steps = 1
    fns = {name: step(tr) for name, tr in trainers.items()}
    # one warm call each first: the peak is read from the process's resident set, and a first call would count the
    # page-in of the memory-mapped checkpoint weights (2 x V x 256 x 4 B: 297 MiB at V=151,936) and one-time
    # allocations as the phase's memory
    for fn in fns.values():
        fn()
    peaks = {name: peak_extra_mib(fn) for name, fn in fns.items()}
    a, b = losses[trainers[OURS]], losses[trainers[TRL]]
    if abs(a - b) > 1e-3 * max(1.0, abs(b)):
        raise AssertionError(f"V={vocab} {dtype}: the patched trainer's loss {a} differs from TRL's {b}")
    dt = str(dtype).replace("torch.", "")
    case = f"V={vocab}, {dt}, B x T = {B} x {T}"
    model = trainers[TRL].model  # the parameter gradients the backward allocates: the same for both trainers
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    rows = summarize("TRL GRPOTrainer: log-prob + loss phase (compute_loss + backward)", case,
                     time_providers(fns, repeats), OURS, peaks=peaks,
                     notes={n: f"peak incl. {grads:.0f} MiB of parameter gradients" for n in fns})
    rfns = {name: ref(tr) for name, tr in trainers.items()}
    for fn in rfns.values():
        fn()
    rpeaks = {name: peak_extra_mib(fn) for name, fn in rfns.items()}
    lp = {name: fn() for name, fn in rfns.items()}
    err = float((lp[OURS] - lp[TRL]).abs().max())
    rows += summarize("TRL GRPOTrainer: reference log-probs (no grad)", case, time_providers(rfns, repeats), OURS,
                      peaks=rpeaks, notes={OURS: f"max |dlogp| vs TRL {err:.1e}"})
    return rows


def bench_whole_step(vocab: int, B: int, T: int, root: Path) -> List[Row]:
    """One trainer.train() step each (generation included); TRL's own step_time metric and wall-clock."""
    path = _checkpoint(root, vocab, torch.float32)
    rows = []
    times: Dict[str, List[float]] = {}
    for name, patched in ((TRL, False), (OURS, True)):
        tr = _trainer(path, T, B, torch.float32, root / f"w{patched}", patched, steps=1)
        t0 = time.perf_counter()
        tr.train()
        wall = time.perf_counter() - t0
        logged = [h for h in tr.state.log_history if "step_time" in h]
        times[name] = [wall]
        note = f"TRL step_time (update only) {logged[-1]['step_time']:.1f} s" if logged else ""
        rows.append((name, wall, note))
    out = summarize("TRL GRPOTrainer: one whole step (generation, rewards, reference, update)",
                    f"V={vocab}, fp32, {B} x {T} generated tokens", times, OURS,
                    notes={n: note for n, _, note in rows})
    return out


def main(argv: Optional[List[str]] = None) -> None:
    if argv is None:  # from the command line (a caller passing argv has set the environment)
        ensure_bench_env("bench.trl_trainer")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--vocabs", type=int, nargs="+", default=None, help="default: 151936 65536 (quick: 151936)")
    ap.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=None,
                    help="default: float32 bfloat16 (quick: float32)")
    ap.add_argument("--tokens", default=None, metavar="BxT",
                    help="completions x completion length (default 4x512, quick 2x128)")
    ap.add_argument("--no-whole-step", dest="whole_step", action="store_false",
                    help="skip the whole trainer.train() steps (fp32; on by default without --quick)")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    try:
        B, T = (int(x) for x in args.tokens.lower().split("x")) if args.tokens else (2, 128) if args.quick else (4, 512)
    except ValueError:
        raise SystemExit(f"--tokens: expected BxT, e.g. 4x512, got {args.tokens!r}")
    vocabs = args.vocabs or ((151936,) if args.quick else (151936, 65536))
    dtypes = [getattr(torch, d) for d in (args.dtypes or (("float32",) if args.quick else ("float32", "bfloat16")))]
    rows: List[Row] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for vocab in vocabs:
            for dtype in dtypes:
                rows += bench_phase(vocab, dtype, B, T, repeats, root)
        if not args.quick and args.whole_step:
            for vocab in vocabs:
                rows += bench_whole_step(vocab, B, T, root)
    import trl

    meta = {**machine_info(), "trl": trl.__version__, "quick": args.quick, "B": B, "T": T}
    path = save_rows("trl_trainer_quick" if args.quick else "trl_trainer", rows, meta)
    print(format_table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
