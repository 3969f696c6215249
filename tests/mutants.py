"""Planted bugs the suite must kill: ``make mutants`` (python tests/mutants.py [--no-clean-run] [NAME ...]).

Each mutant is one plausible bug -- a text substitution in one file -- and the tests that should see it. For each,
the package and the tests are copied to a temporary directory, the bug is applied there, and the tests run against
the copy (PYTHONPATH points at it; the C++ extension is copied along). A mutant is *killed* when the tests fail
(pytest exit code 1); it *survives* when they pass. Exit code 2 (collection / import errors) or a substitution that
no longer matches the source is reported as an error: the list must follow the code. Every mutant must be killed.
Add a mutant for every bug you fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mutant:
    name: str
    file: str
    find: str
    replace: str
    tests: Tuple[str, ...]


TRAINER = "tests/test_trainer.py"
LEARN = "tests/test_grpo_learning.py"
ORACLE = "tests/test_reference_oracle.py"
FALLBACK = "tests/test_fallback.py"
WORLD = "tests/test_world.py"
DIST = "tests/test_trainer.py::test_torchrun_two_processes_equal_single_process"
ATTN = "tests/test_decode_attention.py"
GEN = "tests/test_generate.py"
TRL_RUN = "tests/test_trl_use_kernels.py"
JANUS = "tests/test_janus.py"

MUTANTS: List[Mutant] = [
    Mutant("trainer: negated advantages", "mmr1/grpo.py",
           "adv, st = K.group_advantages(rewards, group_size=G, weights=weights, mode=cfg.adv_mode)",
           "adv, st = K.group_advantages(rewards, group_size=G, weights=weights, mode=cfg.adv_mode)\n        adv = -adv",
           (LEARN,)),
    Mutant("trainer: KL term dropped", "mmr1/grpo.py", "beta=self.cfg.beta, loss_weights=w_all",
           "beta=0.0, loss_weights=w_all", (TRAINER,)),
    Mutant("trainer: eps_low / eps_high swapped", "mmr1/grpo.py",
           "kw = dict(epsilon=self.cfg.eps_low, epsilon_high=self.cfg.eps_high,",
           "kw = dict(epsilon=self.cfg.eps_high, epsilon_high=self.cfg.eps_low,", (TRAINER,)),
    Mutant("trainer: off-by-one target shift", "mmr1/grpo.py",
           "return ro.tokens[:, 1:].to(dev), chosen & img, chosen & ~img",
           "return ro.tokens[:, :-1].to(dev), chosen & img, chosen & ~img", (TRAINER,)),
    Mutant("trainer: image and text temperatures swapped", "mmr1/grpo.py",
           '(("image", m_img, self.vocab.window, scfg.temperature),\n'
           '                ("text", m_txt, self.fmt.text_range, scfg.text_temperature))',
           '(("image", m_img, self.vocab.window, scfg.text_temperature),\n'
           '                ("text", m_txt, self.fmt.text_range, scfg.temperature))', (TRAINER,)),
    Mutant("trainer: reward weights ignored", "mmr1/grpo.py",
           "adv, st = K.group_advantages(rewards, group_size=G, weights=weights,",
           "adv, st = K.group_advantages(rewards, group_size=G, weights=None,", (TRAINER,)),
    Mutant("trainer: gradients summed instead of averaged across ranks", "mmr1/grpo.py",
           "                    loss.backward()\n",
           "                    loss.backward()\n                    [p.grad.mul_(self.world) for p in "
           "self.policy.parameters() if p.grad is not None]\n", (DIST,)),
    Mutant("checkpoint: scheduler not restored", "mmr1/sharded_checkpoint.py",
           "    if scheduler is not None and meta.get(\"scheduler\") is not None:\n        scheduler.load_state_dict(meta[\"scheduler\"])\n",
           "", (TRAINER,)),
    Mutant("checkpoint: RNG not restored", "mmr1/sharded_checkpoint.py",
           "            _set_rng_state(torch.load(rng, map_location=\"cpu\", weights_only=False))",
           "            pass", (TRAINER,)),
    Mutant("checkpoint: optimizer state not saved", "mmr1/sharded_checkpoint.py",
           "    dcp.save({\"train\": _ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(tmp))",
           "    dcp.save({\"train\": _ModelAndOptimizer(model, None)}, checkpoint_id=str(tmp))", (TRAINER,)),
    Mutant("checkpoint: never published (left in the temporary directory)", "mmr1/sharded_checkpoint.py",
           "            os.replace(tmp, final)\n            _publish_latest(root, name)",
           "            pass", (TRAINER,)),
    Mutant("spec: KL term dropped", "mmr1_kernels/reference.py", "        loss = loss + beta * kl\n",
           "        loss = loss\n", (ORACLE,)),
    Mutant("spec: clip bounds swapped", "mmr1_kernels/reference.py",
           "    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv\n    loss = -torch.minimum(unclipped, clipped)",
           "    clipped = ratio.clamp(1.0 - eps_high, 1.0 + eps_low) * adv\n    loss = -torch.minimum(unclipped, clipped)",
           (ORACLE,)),
    Mutant("spec: log-ratio clamp removed", "mmr1_kernels/reference.py",
           "    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))\n    adv = advantages.to(logp.dtype)\n    unclipped = ratio * adv\n    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv\n    loss",
           "    ratio = torch.exp(logp - old)\n    adv = advantages.to(logp.dtype)\n    unclipped = ratio * adv\n    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv\n    loss",
           (ORACLE,)),
    Mutant("fallback: closed-form gradient ignores the clamp", "mmr1_kernels/reference.py",
           "    free = (unclipped <= clipped) & (log_ratio.abs() <= LOG_RATIO_CLAMP)",
           "    free = unclipped <= clipped", (ORACLE,)),
    Mutant("fallback: gradient scaled", "mmr1_kernels/reference.py",
           "        coef = coef + torch.where(delta.abs() <= LOG_RATIO_CLAMP, beta * (1.0 - e), torch.zeros_like(e))\n    return coef",
           "        coef = coef + torch.where(delta.abs() <= LOG_RATIO_CLAMP, beta * (1.0 - e), torch.zeros_like(e))\n    return -3 * coef",
           (FALLBACK,)),
    Mutant("fallback: temperature missing from the backward", "mmr1_kernels/reference.py",
           "    g = grad_logprobs.reshape(z.shape[:-1]).to(acc)\n",
           "    g = grad_logprobs.reshape(z.shape[:-1]).to(acc) * temperature\n", (FALLBACK,)),
    Mutant("spec: grpo aggregation misses 1/B", "mmr1_kernels/reference.py",
           "        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) / B",
           "        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)", (ORACLE,)),
    Mutant("spec: grpo advantages not divided by the group std", "mmr1_kernels/reference.py",
           "        adv = _scaled(combined - mean[group_index], std[group_index] + eps)",
           "        adv = combined - mean[group_index]", (ORACLE,)),
    Mutant("sft: targets not shifted", "mmr1/sft.py",
           "    targets = tokens[:, 1:].to(hidden.device)", "    targets = tokens[:, :-1].to(hidden.device)",
           (TRAINER,)),
    Mutant("generation: CFG ignored on hidden states", "mmr1/generate.py",
           "hg = feats[m:] + scfg.cfg_scale * (hc - feats[m:]) if use_cfg else hc", "hg = hc",
           ("tests/test_generate.py",)),
    Mutant("generation: Jacobi accepts one token past the first mismatch", "mmr1/generate.py",
           "k = torch.minimum(run + 1, L - final) * active", "k = torch.minimum(run + 2, L - final) * active",
           ("tests/test_generate.py",)),
    Mutant("generation: Jacobi drafts never updated from the draws", "mmr1/generate.py",
           "cur[rows_t[keep_cols], tgt[keep_cols]] = tok[keep_cols]",
           "cur[rows_t[keep_cols & take], tgt[keep_cols & take]] = tok[keep_cols & take]", ("tests/test_generate.py",)),
    Mutant("world: identity reward without the whole-subject term", "mmr1/world/identity.py",
           "    return 0.5 * sum(right) / len(right) + 0.5 * float(all(right))",
           "    return sum(right) / len(right)", (WORLD,)),
    Mutant("world: reasoning judged without the subjects' order", "mmr1/world/identity.py",
           "    named = parse_subjects(text)\n    truth = list(scene.subjects)",
           "    named = sorted(parse_subjects(text), key=str)\n    truth = list(scene.subjects)", (WORLD,)),
    Mutant("world: consistency reward reads the pair's sides the wrong way round", "mmr1/world/identity.py",
           "[read[scene.first_position], read[scene.second_position]]",
           "[read[scene.second_position], read[scene.first_position]]", (WORLD,)),
    Mutant("trainer: zero-signal steps still update", "mmr1/grpo.py",
           "skip = cfg.skip_zero_signal_steps and float(signal) == 0.0", "skip = False", (TRAINER,)),
    Mutant("world: pair layout ignores which subject is on which side", "mmr1/world/identity.py",
           "ok.append(float(present and self._nearer(codes, scene.background, side, cols, mine, other)))",
           "ok.append(float(present))", (WORLD,)),
    Mutant("entropy: Triton forward without the lanes' re-centring", "mmr1_kernels/gpu/logprob.py",
           "t = tl.sum(lane_scale * (t_vec + s_vec * lane_shift), axis=0)",
           "t = tl.sum(lane_scale * t_vec, axis=0)", ("tests/test_entropy.py",)),
    Mutant("entropy: backward without the H term (grad -p log p only)", "mmr1_kernels/reference.py",
           "term = torch.where(p > 0, p * (logq + h.unsqueeze(-1)), torch.zeros_like(p))",
           "term = torch.where(p > 0, p * logq, torch.zeros_like(p))", ("tests/test_entropy.py",)),
    Mutant("policy_loss: GSPO sequence ratio summed instead of length-normalised", "mmr1_kernels/policy.py",
           "log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)",
           "log_w = (log_ratio * m).sum(-1).unsqueeze(-1)", ("tests/test_trl_parity.py",)),
    Mutant("policy_loss: bias-corrected KL ignored", "mmr1_kernels/policy.py",
           "        if cfg.use_bias_correction_kl:\n            kl = kl * ratio",
           "        if False:\n            kl = kl * ratio", ("tests/test_trl_parity.py",)),
    Mutant("policy_loss: two-sided clipping (delta) ignored", "mmr1_kernels/policy.py",
           "unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)",
           "unclipped = ratio", ("tests/test_trl_parity.py",)),
    Mutant("policy_loss: cispo weight not detached", "mmr1_kernels/policy.py",
           "token_loss = -torch.clamp(ratio, max=eps_high).detach() * adv * logprobs",
           "token_loss = -torch.clamp(ratio, max=eps_high) * adv * logprobs", ("tests/test_trl_parity.py",)),
    Mutant("policy_loss: entropy bonus not scaled for accumulation", "mmr1_kernels/policy.py",
           "em.sum().clamp(min=1.0) / gas)", "em.sum().clamp(min=1.0))", ("tests/test_trl_parity.py",)),
    Mutant("recipe: a rerun of grpo does not resume from its checkpoint", "mmr1/recipe.py",
           "    if latest_checkpoint(ckpt) is not None:\n        trainer.load(ckpt)\n    grids",
           "    grids", ("tests/test_soak.py",)),
    Mutant("sft: multi-process loss normalized per rank, not globally", "mmr1/sft.py",
           "global_sum=self._global_sum if self.world > 1 else None", "global_sum=None",
           ("tests/test_recipe.py::test_end_to_end_real_parts_torchrun",
            "tests/test_janus.py::test_janus_sft_under_ddp_equals_one_process")),
    Mutant("data: token cache keyed without the tokenizer", "mmr1/data.py",
           "        return h.hexdigest()[:24]", "        return \"tokens\"", ("tests/test_recipe.py",)),
    Mutant("trainer: micro-batch loss weights normalized per micro-batch", "mmr1/grpo.py",
           "        targets, m_img, m_txt, w_all = targets[rows], m_img[rows], m_txt[rows], w_all[rows]",
           "        targets, m_img, m_txt = targets[rows], m_img[rows], m_txt[rows]\n"
           "        w_all = K.reference.loss_weights(m_img | m_txt, self.cfg.loss_type)", (TRAINER,)),
    Mutant("trainer: DDP never syncs the micro-batches' gradients", "mmr1/grpo.py",
           "sync = contextlib.nullcontext() if last or self.parallel != \"ddp\" else self.model.no_sync()",
           "sync = contextlib.nullcontext() if self.parallel != \"ddp\" else self.model.no_sync()", (DIST,)),
    Mutant("trainer: FSDP rollouts re-gather every block at every decode step", "mmr1/grpo.py",
           "        with self._whole_policy_for_rollouts():\n", "        with contextlib.nullcontext():\n",
           ("tests/test_trainer.py::test_fsdp_rollouts_gather_each_block_once",)),
    Mutant("model: activation checkpointing never recomputes", "mmr1/model.py",
           "recompute = self.activation_checkpointing and torch.is_grad_enabled() and not isinstance(ctx, CacheStep)",
           "recompute = False", ("tests/test_trainer.py::test_activation_checkpointing_changes_memory_not_the_update",)),
    # decode attention (issue 20): the spec, the Triton kernel, the decoder's layout
    Mutant("attention: reference window not causal (sees one slot less)", "mmr1_kernels/reference.py",
           "limit = lengths.long()[:, None] + torch.arange(W, device=dev)[None] + 1",
           "limit = lengths.long()[:, None] + torch.arange(W, device=dev)[None]", (ATTN,)),
    Mutant("attention: Triton combine drops the prefix's partial states", "mmr1_kernels/gpu/attention.py",
           "        use = use & ((s >= NS_PREFIX) | has)", "        use = use & (s >= NS_PREFIX)", (ATTN,)),
    Mutant("attention: Triton window off by one", "mmr1_kernels/gpu/attention.py",
           "limit = tl.minimum(base + w + 1, S)  # causal inside the window",
           "limit = tl.minimum(base + w, S)  # causal inside the window", (ATTN,)),
    Mutant("decoder: a prompt's rows point at the wrong prompts", "mmr1/generate.py",
           "prompt_of_row = torch.arange(len(seqs)).repeat_interleave(repeats).tolist()",
           "prompt_of_row = torch.arange(len(seqs)).repeat(repeats).tolist()", (GEN,)),
    Mutant("decoder: rows' own slots start at position 0 (no prefix offset)", "mmr1/kv_cache.py",
           "        self.offset[lo:hi] = lengths[of_row]",
           "        self.offset[lo:hi] = 0", (GEN,)),
    Mutant("decoder: a prefix row reads the prompt store from 0, not its own prompt", "mmr1/kv_cache.py",
           "        self.prefix_of_row[lo:hi] = first + of_row", "        self.prefix_of_row[lo:hi] = of_row",
           (GEN, JANUS)),
    Mutant("generation: the unconditional rows keep the conditional context", "mmr1/generate.py",
           "        if contexts is None:\n            self.restart(n, 2 * n)\n            return",
           "        if contexts is None:\n            return", (GEN, JANUS)),
    # runs that survive clusters (issue 27)
    Mutant("trainer: a non-finite step is applied anyway", "mmr1/grpo.py",
           "            nonfinite = self._nonfinite(loss, gnorm)\n            if nonfinite:",
           "            nonfinite = self._nonfinite(loss, gnorm)\n            if False:",
           ("tests/test_trainer.py::test_a_nonfinite_step_is_applied_nowhere_logged_and_the_run_stops_after_max_in_a_row",)),
    Mutant("trainer: non-finite steps in a row never stop the run", "mmr1/grpo.py",
           "            if self.nonfinite_run >= cfg.max_nonfinite_steps:", "            if False:",
           ("tests/test_trainer.py::test_a_nonfinite_step_is_applied_nowhere_logged_and_the_run_stops_after_max_in_a_row",)),
    Mutant("trainer: preemption exits without writing the step's checkpoint", "mmr1/grpo.py",
           "                    if checkpoint_dir and not saved:", "                    if False:",
           ("tests/test_trainer.py::test_sigterm_to_one_rank_stops_every_rank_after_the_step_with_a_checkpoint_and_the_rerun_is_exact",)),
    Mutant("preemption: the launcher's forwarded copy of the SIGTERM counts as a second signal (no checkpoint)",
           "mmr1/preemption.py", "            if time.monotonic() - self._first_at < REPEAT_WINDOW_S:",
           "            if False:",
           ("tests/test_trainer.py::test_a_repeated_signal_within_the_window_is_one_request_a_later_one_exits_at_once",)),
    Mutant("recipe: mmr1 grpo ignores SIGTERM (no preemption checkpoint)", "mmr1/recipe.py",
           "keep_last=args.keep_last, callbacks=[sample_grid], handle_signals=True)",
           "keep_last=args.keep_last, callbacks=[sample_grid], handle_signals=False)", ("tests/test_soak.py",)),
    Mutant("trainer: no named wait after the rollouts (a hung rank is a bare backend timeout)", "mmr1/grpo.py",
           "            wait_for_all_ranks(f\"step {step}'s rollouts and rewards (round {round_})\")", "            pass",
           ("tests/test_trainer.py::test_a_hung_rank_ends_the_job_with_an_error_naming_it",)),
    Mutant("distributed: workers of a killed launcher train on, orphaned", "mmr1/distributed.py",
           "        _stop_with_the_launcher()", "        pass", ("tests/test_soak.py",)),
    Mutant("cfg_loss: the rollouts record the sampler's log-probs whatever the loss trains", "mmr1/grpo.py",
           "        recorded = CFG_LOSSES[self.cfg_loss] if self.mu > 1 else \"sampler\"",
           "        recorded = \"sampler\"",
           ("tests/test_cfg_loss.py",)),
    Mutant("cfg_loss: the unconditional branch's hidden states one position late", "mmr1/grpo.py",
           "                dst_pos.append(start + j)", "                dst_pos.append(start + j + 1)",
           ("tests/test_cfg_loss.py",)),
    Mutant("cfg_loss: guided_detached does not detach the unconditional branch", "mmr1/grpo.py",
           "with torch.no_grad() if self.cfg.cfg_loss == \"guided_detached\" else contextlib.nullcontext():",
           "with contextlib.nullcontext():", ("tests/test_cfg_loss.py",)),
    Mutant("cfg_loss: guided_scaled trains the guided logits unscaled", "mmr1/grpo.py",
           "        return mix / g if self.cfg.cfg_loss == \"guided_scaled\" else mix", "        return mix",
           ("tests/test_cfg_loss.py",)),
    Mutant("recipe: mmr1 sft ignores SIGTERM (no preemption checkpoint)", "mmr1/recipe.py",
           "            signum = agreed_signal(flag.signum)\n", "            signum = 0\n",
           ("tests/test_recipe.py::test_sft_preempted_by_sigterm_checkpoints_its_step_and_the_rerun_is_exact",)),
    Mutant("trainer: Janus's unused text head left trainable (DDP waits for its gradient)", "mmr1/grpo.py",
           "            policy.lm_head.weight.requires_grad_(False)", "            pass",
           ("tests/test_janus.py::test_janus_under_ddp_and_fsdp_equals_one_process",)),
    Mutant("trainer: the frozen reference model left whole on every rank under FSDP2", "mmr1/grpo.py",
           "                wrap_parallel(self.ref, \"fsdp\")", "                pass", (DIST,)),
    Mutant("sft: Janus's image codes scored through the text head's softmax", "mmr1/sft.py",
           "    window = head.image_window\n", "    window = None\n", (JANUS,)),
    Mutant("checkpoint: checksums never compared", "mmr1/sharded_checkpoint.py",
           "        if _sha256(f) != want[\"sha256\"]:", "        if False:",
           ("tests/test_trainer.py::test_a_corrupt_checkpoint_is_named_and_a_resume_falls_back_to_the_newest_that_verifies",)),
    Mutant("checkpoint: a resume loads the newest checkpoint without verifying it", "mmr1/sharded_checkpoint.py",
           "    for candidate in candidates:\n        error = _verified_on_rank0(candidate)",
           "    for candidate in candidates:\n        error = None",
           ("tests/test_trainer.py::test_a_corrupt_checkpoint_is_named_and_a_resume_falls_back_to_the_newest_that_verifies",)),
    Mutant("checkpoint: a failed save leaves its partial directory", "mmr1/sharded_checkpoint.py",
           "        shutil.rmtree(tmp, ignore_errors=True)", "        pass",
           ("tests/test_trainer.py::test_a_write_error_during_a_save_leaves_the_previous_checkpoint_loadable",)),
    # Janus-Pro (issue 26)
    Mutant("janus: the unconditional context loses its BOS", "mmr1/janus.py",
           "return [[bos] + [pad] * (n - 1) for n in lengths]", "return [[pad] * n for n in lengths]", (JANUS,)),
    Mutant("janus: vision_head's bias left out of the fused loss", "mmr1/model.py",
           "        x = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)",
           "        x = torch.cat([x, torch.zeros(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)], -1)", (JANUS,)),
    Mutant("janus: image codes embedded through the text table", "mmr1/janus.py",
           "out = torch.where(is_code[..., None], codes.to(text.dtype), text)",
           "out = self.model.embed_tokens(tokens.clamp(max=self.text_vocab - 1))", (JANUS,)),
    Mutant("janus: a prompt image's features never read (its ids embedded as text)", "mmr1/janus.py",
           "        if len(self.prompt_images):  # prompt images", "        if False:  # prompt images", (JANUS,)),
    Mutant("janus: the prompt-image bank copied with the model (the reference model misses later images)",
           "mmr1/janus.py", "    def __deepcopy__(self, memo):\n        return self\n", "", (JANUS,)),
    Mutant("janus: DeepSeek's fused SigLIP qkv split in the wrong order", "mmr1/janus.py",
           'zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, 0))', 'zip(("k_proj", "q_proj", "v_proj"), v.chunk(3, 0))',
           (JANUS,)),
    Mutant("janus: the VQ loader reads the whole checkpoint (the language model too)", "mmr1/janus.py",
           '    state = _read_weights(path, keep=lambda k: k.startswith(("model.vqmodel.", "gen_vision_model.")))',
           "    state = _read_weights(path)", (JANUS,)),
    Mutant("export: a Janus export writes the base's weights, not the trained ones", "mmr1/janus.py",
           "            state[key] = trained[ours]\n", "            state[key] = value\n",
           ("tests/test_janus_cli.py::test_janus_sft_export_grpo_resume_export_under_torchrun[deepseek-ddp]",)),
    Mutant("janus: guidance mixed in the backbone's hidden state, before the head's GELU", "mmr1/generate.py",
           "        hg = feats[m:] + scfg.cfg_scale * (hc - feats[m:]) if use_cfg else hc",
           "        hg = model.output_head(hidden[m:] + scfg.cfg_scale * (hidden[:m] - hidden[m:]), vocab.window)[0] "
           "if use_cfg else hc", (JANUS,)),
    Mutant("decoder: writes past a row's own slots not refused", "mmr1/generate.py",
           "            if h - self.offset[r] > self.capacity:", "            if False:", (GEN,)),
    # dynamic sampling, the data pipeline (issue 21)
    Mutant("dynamic sampling keeps the groups without spread", "mmr1/grpo.py",
           "(spare if z else kept).append(", "(kept if z else spare).append(", (TRAINER,)),
    Mutant("pipeline: identity mixing into the first subject", "mmr1/world/pipeline.py",
           "            second, applied = m, applied + [\"identity_mixing\"]",
           "            first, applied = m, applied + [\"identity_mixing\"]", (WORLD,)),
    Mutant("pipeline: flaws drawn from the task stream", "mmr1/world/tasks.py",
           "flawed_targets(scene, mix.flaws, g if flaw_g is None else flaw_g, xcot=not mix.direct)",
           "flawed_targets(scene, mix.flaws, g, xcot=not mix.direct)", (WORLD,)),
    Mutant("pipeline: swapped sides read from one side only", "mmr1/world/pipeline.py",
           "    swapped = at_first == second and at_second == first", "    swapped = at_first == second",
           (WORLD,)),
    # TRL integration (issue 22)
    Mutant("trl: loss not divided by gradient accumulation", "mmr1_kernels/trl.py",
           "    gas = self.current_gradient_accumulation_steps if mode == \"train\" else 1",
           "    gas = 1", (TRL_RUN,)),
    Mutant("trl: fused head without the temperature", "mmr1_kernels/trl.py",
           "res = fused_linear_logprobs(h, weight, labels[mask], temperature, chunk_size=chunk_size,",
           "res = fused_linear_logprobs(h, weight, labels[mask], 1.0, chunk_size=chunk_size,", (TRL_RUN,)),
    Mutant("policy_loss: a given entropy mask ignored", "mmr1_kernels/policy.py",
           "        ent_mask = entropy_mask.bool() & mask.bool()", "        ent_mask = None", (TRL_RUN,)),
    # fp32-upcast 16-bit CPU GEMMs in the fused head
    Mutant("fused head: upcast dh drops the last weight block", "mmr1_kernels/fused_linear.py",
           "    for s in range(0, w_win.shape[0], _UPCAST_BLOCK):\n        acc.addmm_(",
           "    for s in range(0, w_win.shape[0] - _UPCAST_BLOCK, _UPCAST_BLOCK):\n        acc.addmm_(",
           ("tests/test_fused_linear.py",)),
    Mutant("fused head: upcast weight grad not accumulated across chunks", "mmr1_kernels/fused_linear.py",
           "                self.win[s:s + _UPCAST_BLOCK].addmm_(dz[:, s:s + _UPCAST_BLOCK].t().float(), hf)",
           "                self.win[s:s + _UPCAST_BLOCK].copy_(dz[:, s:s + _UPCAST_BLOCK].t().float() @ hf)",
           ("tests/test_fused_linear.py",)),
    # the update through the shared prefix
    Mutant("shared prefix attention: an empty prompt's lse left at 0", "mmr1_kernels/attention.py",
           '        l1 = l1.masked_fill(empty, float("-inf"))', "        l1 = l1",
           ("tests/test_shared_prefix_attention.py",)),
    Mutant("shared prefix hidden: completion 0 predicted from the prompt's first position", "mmr1/model.py",
           "    last = hp[torch.arange(hp.shape[0], device=dev), prefix.lengths - 1]",
           "    last = hp[torch.arange(hp.shape[0], device=dev), prefix.lengths * 0]", ("tests/test_model.py",)),
    Mutant("split_shared_prefix: a prompt drawn twice in a row breaks the split", "mmr1/model.py",
           "    G = math.gcd(*runs)", "    G = runs[0] if all(g == runs[0] for g in runs) else 1",
           ("tests/test_model.py",)),
]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "assets")
    for pkg in ("mmr1", "mmr1_kernels", "tests", "bench"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=ignore)
    shutil.copytree(ROOT / "mmr1" / "assets", dst / "mmr1" / "assets")  # the shipped demo (read by a few tests)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _pytest(dst: Path, tests, timeout: int = 1200) -> Tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": str(dst), "MMR1_REQUIRE_CPP": "1"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=dst,
                         env=env, capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout[-1500:] + out.stderr[-1500:], time.perf_counter() - t0


def run(names=None, check_clean: bool = True) -> int:
    chosen = [m for m in MUTANTS if not names or any(n.lower() in m.name.lower() for n in names)]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="mmr1-mutants-") as tmp:
        base = Path(tmp) / "clean"
        _copy_tree(base)
        tests = sorted({t for m in chosen for t in m.tests})
        if check_clean:
            rc, log, secs = _pytest(base, tests)
            if rc != 0:
                print(f"the unmutated copy fails its tests (exit {rc}): fix that first\n{log}")
                return 1
            print(f"unmutated copy: {len(tests)} test targets pass ({secs:.0f} s)")
        for m in chosen:
            dst = Path(tmp) / "m"
            if dst.exists():
                shutil.rmtree(dst)
            _copy_tree(dst)
            path = dst / m.file
            src = path.read_text()
            if src.count(m.find) != 1:
                rows.append((m.name, "STALE", f"the text to replace occurs {src.count(m.find)} times in {m.file}", 0))
                bad += 1
                continue
            path.write_text(src.replace(m.find, m.replace))
            rc, log, secs = _pytest(dst, m.tests)
            if rc == 1:
                failed = [ln for ln in log.splitlines() if ln.startswith("FAILED")]
                rows.append((m.name, "killed", failed[0][7:110] if failed else "", secs))
            elif rc == 0:
                rows.append((m.name, "SURVIVED", " ".join(m.tests), secs))
                bad += 1
            else:
                rows.append((m.name, f"ERROR (pytest exit {rc})", log.strip().splitlines()[-1][:100], secs))
                bad += 1
            print(f"{rows[-1][1]:>9s}  {m.name}  ({secs:.0f} s)", flush=True)
    print(f"\n{'mutant':62s} {'result':9s} {'by':s}")
    for name, result, by, _ in rows:
        print(f"{name:62s} {result:9s} {by}")
    print(f"\n{len(rows) - bad} of {len(rows)} mutants killed")
    return 1 if bad else 0


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Planted bugs the suite must kill (see this file's docstring).")
    ap.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these (any case)")
    ap.add_argument("--no-clean-run", action="store_true",
                    help="skip the unmutated copy's run (a sanity check) when it is known good")
    ns = ap.parse_args()
    chosen = [m for m in MUTANTS if not ns.names or any(n.lower() in m.name.lower() for n in ns.names)]
    if not chosen:
        ap.error(f"no mutant's name contains any of {ns.names}")
    sys.exit(run(ns.names, not ns.no_clean_run))
