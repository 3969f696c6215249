"""use_mmr1_kernels(trainer) on real trl.GRPOTrainer runs: the same logged metrics and the same weights as the
unpatched trainer from the same seed, for a Qwen2-like 151,936-token vocabulary and a Llama; and every option the
patch cannot honour refused by name."""
from __future__ import annotations

import math

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mmr1_kernels.trl import use_mmr1_kernels  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _tokenizer(vocab_size):
    """A word-level tokenizer with exactly the model's vocabulary (so every generated id decodes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", padding_side="left")


def _model(kind):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                  tie_word_embeddings=False)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=12, **common))
    with torch.no_grad():  # peaked, token-dependent distributions: entropies spread out (with the default init every
        model.lm_head.weight.normal_(0.0, 0.5)  # token's entropy is ~ln V, and the top-entropy quantile mask that
    return model  # top_entropy_quantile takes is decided by rounding-level differences)


def _good(word):
    return word in ("a", "c") or (word.startswith("w") and int(word[1:]) % 3 == 0)


def _reward(completions, **_):  # a spread in both vocabularies (in the big one most words are w<i>)
    return [float(sum(_good(w) for w in c.split())) for c in completions]


def _run(tmp_path, kind, loss_type, level, patched):
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model = _model(kind)
    tok = _tokenizer(model.config.vocab_size)
    model_dir = tmp_path / kind  # a local checkpoint: TRL builds its reference model from the path
    if not model_dir.exists():
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(6)] * 8})
    args = GRPOConfig(output_dir=str(tmp_path / f"out-{patched}"), per_device_train_batch_size=4, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=6, max_steps=4, logging_steps=1,
                      report_to=[], use_cpu=True, learning_rate=3e-2, beta=0.04, temperature=0.9, loss_type=loss_type,
                      importance_sampling_level=level, save_strategy="no", seed=0, log_completions=False,
                      top_entropy_quantile=0.8, num_iterations=2, bf16=False,
                      # plain SGD: the step is the gradient, so it is compared at the gradient's rounding (AdamW's
                      # first step is lr * sign(g) for |g| >> eps and turns a rounding-level g into a full-size step)
                      optim="sgd")
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=_reward, args=args, train_dataset=prompts,
                          processing_class=tok)
    if patched:
        assert use_mmr1_kernels(trainer) is trainer
    first = {}
    prev = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    class FirstUpdate(TrainerCallback):
        # the first optimizer step that moved the weights (a step whose groups all have zero reward spread has a zero
        # gradient; which steps do depends on the machine's sampling): the step number, and for every parameter the
        # update it took and the weight's largest magnitude
        def on_step_end(self, a, state, control, **kw):
            if first:
                return
            now = {n: p.detach() for n, p in trainer.model.named_parameters()}
            if any(bool((now[n] != prev[n]).any()) for n in now):
                first["step"] = state.global_step
                first["update"] = {n: (now[n] - prev[n], now[n].abs().max()) for n in now}
            else:
                prev.update({n: t.clone() for n, t in now.items()})

    trainer.add_callback(FirstUpdate())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "entropy" in h]
    return logs, first, trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("grpo", "sequence")])
def test_patched_trainer_logs_and_steps_as_the_unpatched_one(tmp_path, kind, loss_type, level):
    calls = {"ours": 0}
    import mmr1_kernels.trl as mt

    real = mt.fused_linear_logprobs

    def counting(*a, **k):
        calls["ours"] += 1
        return real(*a, **k)

    base_logs, base_w, _ = _run(tmp_path, kind, loss_type, level, patched=False)
    mt.fused_linear_logprobs = counting
    try:
        logs, w, trainer = _run(tmp_path, kind, loss_type, level, patched=True)
    finally:
        mt.fused_linear_logprobs = real
    assert any(log["frac_reward_zero_std"] < 1 for log in base_logs if "frac_reward_zero_std" in log)  # a signal
    # every log-prob of the run came from mmr1's kernel (4 steps x (policy per micro-batch + old + ref)), and the
    # loss from policy_loss
    assert calls["ours"] >= 4 * 2
    assert trainer._compute_loss.__func__ is mt._compute_loss
    assert len(logs) == len(base_logs) == 4
    keys = ["loss", "kl", "entropy"] + (["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                         "clip_ratio/low_min", "clip_ratio/high_max"])
    for a, b in zip(logs, base_logs):
        for k in keys:  # fp32 round-off of the head (Trainer rounds the logged loss to 4 digits)
            assert math.isclose(a[k], b[k], rel_tol=2e-4, abs_tol=2e-6), (k, a[k], b[k])
    assert base_w and w, "no optimizer step moved the weights: the run has no signal"
    assert w["step"] == base_w["step"]
    # the first update of every parameter: equal to 1e-4 of the tensor's largest update, plus the rounding of the
    # stored weights themselves (an update read as after - before carries one ulp of the weight)
    for n in base_w["update"]:
        (u, wmax), (bu, bmax) = w["update"][n], base_w["update"][n]
        tol = 1e-4 * float(bu.abs().max()) + 4 * 2.0 ** -24 * float(max(wmax, bmax))
        assert float((u - bu).abs().max()) <= tol, (n, float((u - bu).abs().max()), tol)


def test_use_mmr1_kernels_refuses_what_it_cannot_honour(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    model = _model("llama")
    tok = _tokenizer(model.config.vocab_size)
    prompts = datasets.Dataset.from_dict({"prompt": ["a b c"] * 8})
    args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                      bf16=False)
    with pytest.raises(TypeError, match="must be a trl.GRPOTrainer"):
        use_mmr1_kernels(object())
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=prompts, processing_class=tok)
    with pytest.raises(ValueError, match="lm_head has a bias"):
        use_mmr1_kernels(trainer)
    model = _model("llama")
    model.config.final_logit_softcapping = 30.0
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=prompts, processing_class=tok)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        use_mmr1_kernels(trainer)
    model = _model("llama")
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=prompts, processing_class=tok)
    use_mmr1_kernels(trainer)
    with pytest.raises(RuntimeError, match="already applied"):
        use_mmr1_kernels(trainer)
