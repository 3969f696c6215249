"""A short real trl.GRPOTrainer run (tiny random Llama, CPU, HF generation, a toy reward): at every step the
batch TRL trains on is recomputed with mmr1_kernels -- per-token log-probs and entropies from the hidden states by
fused_linear_logprobs, the loss by policy_loss -- and must match what TRL computed and logged."""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import mmr1_kernels as K  # noqa: E402
from mmr1_kernels.policy import PolicyLossConfig  # noqa: E402

pytestmark = pytest.mark.slow
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def _model(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _reward(completions, **_):
    return [float(c.split().count("a")) for c in completions]  # say "a" often


@pytest.mark.parametrize("loss_type,level,beta", [("dapo", "token", 0.04), ("grpo", "sequence", 0.0)])
def test_trl_grpo_trainer_steps_match_our_ops(tmp_path, loss_type, level, beta):
    from trl import GRPOConfig, GRPOTrainer

    tok = _tokenizer()
    model_dir = tmp_path / "tiny-llama"  # a local checkpoint: TRL builds its reference model from the path
    _model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(6)] * 4})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=3, logging_steps=1, report_to=[], use_cpu=True,
                      learning_rate=3e-2, beta=beta, temperature=0.9, loss_type=loss_type,
                      importance_sampling_level=level, save_strategy="no", seed=0, log_completions=False,
                      top_entropy_quantile=0.8, num_iterations=2, bf16=False)  # fp32: compared at fp32 round-off
    ours_cfg = PolicyLossConfig(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                                epsilon=args.epsilon, epsilon_high=args.epsilon_high, delta=args.delta,
                                use_bias_correction_kl=args.use_bias_correction_kl, top_entropy_quantile=0.8,
                                max_completion_length=args.max_completion_length)
    steps = []

    class Recorder(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            seen = {}
            original = self._get_per_token_logps_and_entropies

            def spy(*a, **k):
                seen["out"] = original(*a, **k)
                return seen["out"]

            self._get_per_token_logps_and_entropies = spy
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                del self._get_per_token_logps_and_entropies
            with torch.no_grad():  # the same model state TRL just used (before the optimizer step)
                ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
                am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
                T = inputs["completion_ids"].shape[1]
                hidden = model.model(input_ids=ids, attention_mask=am).last_hidden_state[:, -T - 1:-1]
                logp, ent = K.fused_linear_logprobs(hidden, model.lm_head.weight, inputs["completion_ids"],
                                                    temperature=self.temperature, return_entropy=True)
                normaliser = (inputs["num_items_in_batch"] / self.accelerator.num_processes
                              * self.current_gradient_accumulation_steps / self.args.steps_per_generation)
                ours, metrics = K.policy_loss(
                    logp, inputs["advantages"], inputs["completion_mask"],
                    old_logprobs=inputs.get("old_per_token_logps"), ref_logprobs=inputs.get("ref_per_token_logps"),
                    entropies=ent, num_items_in_batch=normaliser,
                    gradient_accumulation_steps=self.current_gradient_accumulation_steps, config=ours_cfg)
            steps.append(dict(trl_logp=seen["out"][0].detach(), trl_ent=seen["out"][1].detach(), logp=logp, ent=ent,
                              mask=inputs["completion_mask"].bool(), trl_loss=float(loss.detach()), loss=float(ours),
                              metrics={k: float(v) for k, v in metrics.items()},
                              old=inputs.get("old_per_token_logps")))
            return loss

    trainer = Recorder(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=prompts, processing_class=tok)
    trainer.train()

    assert len(steps) == 3
    assert any(s["old"] is not None and float((s["old"] - s["trl_logp"]).abs().max()) > 1e-4 for s in steps), \
        "num_iterations=2 should make some step off-policy"
    logged = [h for h in trainer.state.log_history if "loss" in h and "entropy" in h]
    assert len(logged) == 3
    for step, log in zip(steps, logged):
        m = step["mask"]
        # TRL's chunked fused LM head and ours: fp32 round-off of a [*, 32] x [32, 12] head
        torch.testing.assert_close(step["logp"][m], step["trl_logp"][m], rtol=0, atol=2e-5)
        torch.testing.assert_close(step["ent"][m], step["trl_ent"][m], rtol=0, atol=2e-5)
        assert math.isclose(step["loss"], step["trl_loss"], rel_tol=1e-4, abs_tol=1e-5), (step["loss"], step["trl_loss"])
        # what TRL logged for the step (the Trainer rounds the loss for its log)
        assert math.isclose(step["loss"], log["loss"], rel_tol=1e-3, abs_tol=1e-4), (step["loss"], log["loss"])
        assert math.isclose(step["metrics"]["entropy"], log["entropy"], rel_tol=1e-4, abs_tol=1e-6)
        if beta:
            assert math.isclose(step["metrics"]["kl"], log["kl"], rel_tol=1e-3, abs_tol=1e-6)
    # the run trained: the policy moved between the first and the last step
    assert float((steps[0]["trl_logp"] - steps[-1]["trl_logp"]).abs().max()) > 0
