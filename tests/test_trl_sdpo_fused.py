"""A peer trainer on opcod_kernels: TRL's SDPO trainer (trl.experimental.sdpo, TRL 1.16) with its
logit-level self-distillation loss computed by fused_linear_jsd from hidden states, on a tiny Qwen3
built offline. The first step's loss and gradients are compared with the same trainer's own loss.
Also: TRL's GKD loss (generalized_jsd_loss on logits) is opcod_kernels.jsd with labels.

TRL 1.16 has no hook for a fused loss in SDPO: its loss path forwards both models to full
[B, T, V] logits (_compute_teacher_student_logits -> _forward_logits) and reduces them in
_compute_self_distillation_loss. The subclass below overrides compute_loss for the logit-level
modes only (full_logits, topk_logits, distillation_weight = 1) and leaves everything else to TRL."""
import functools
import math
import os

import pytest
import torch

from opcod_kernels import fused_linear_jsd, fused_linear_logprobs


@functools.cache
def trainer_classes():
    """(FusedSDPOTrainer, FirstStepChecked), built on first use: collecting this file imports no
    TRL (the vLLM lane collects it beside another transformers); running a test without TRL fails."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdpo import SDPOTrainer

    class FusedSDPOTrainer(SDPOTrainer):
        """SDPOTrainer whose logit-level distillation loss never holds [B, T, V] logits."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if (return_outputs or self.args.distillation_weight != 1.0 or self.use_teacher_server
                    or self.args.distillation_mode not in ("full_logits", "topk_logits")):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            scale = self.current_gradient_accumulation_steps if self.model.training else 1.0
            return self.fused_distillation_loss(model, inputs) / scale

        def _completion_hidden(self, model, input_ids, attention_mask, n):
            # The states _forward_logits turns into logits: positions -n-1 .. -2 predict the completion.
            lm = self.accelerator.unwrap_model(model)
            out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            h = out.last_hidden_state
            return h[:, -n - 1:-1], lm.get_output_embeddings().weight

        def fused_distillation_loss(self, model, inputs):
            args = self.args
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            B, n = completion_ids.shape
            mask = completion_mask.float()
            if inputs.get("self_distillation_mask") is not None:
                mask = mask * inputs["self_distillation_mask"].unsqueeze(1)
            h_s, W = self._completion_hidden(model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
                                             torch.cat([inputs["prompt_mask"], completion_mask], 1), n)
            with torch.no_grad(), self._get_teacher_context_for_self_distillation():
                h_t, W_t = self._completion_hidden(self.teacher_model, inputs["teacher_input_ids"],
                                                   inputs["teacher_attention_mask"], n)
            h_s, h_t = h_s.reshape(B * n, -1), h_t.reshape(B * n, -1)
            # SDPO's reduction as token weights: each sequence's token mean, averaged over sequences.
            weights = mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / B
            old = inputs.get("old_per_token_logps")
            if args.distillation_is_clip is not None and old is not None:
                with torch.no_grad():  # the clipped importance ratio is a detached per-token weight
                    logp = fused_linear_logprobs(h_s, W, completion_ids.reshape(-1), temperature=self.temperature)
                    ratio = torch.exp((logp.view(B, n) - old).clamp(-20.0, 20.0)).clamp(max=args.distillation_is_clip)
                weights = weights * ratio
            topk = args.distillation_topk if args.distillation_mode == "topk_logits" else None
            loss, rows = fused_linear_jsd(
                h_s, h_t, W, None if W_t is W else W_t, beta=args.distillation_alpha,
                student_temperature=self.temperature, teacher_temperature=self.temperature,
                token_weights=weights.reshape(-1), reduction="sum", topk=topk, tail=args.distillation_add_tail,
                return_token_losses=True)
            mode = "train" if model.training else "eval"
            flat = mask.reshape(-1)
            self._log_self_distillation_metric(mode, ((rows * flat).sum() / flat.sum().clamp(min=1.0)).item())
            return loss

    class FirstStepChecked(FusedSDPOTrainer):
        """Records, on the first batch, TRL's own loss and ours with their gradients, and TRL's loss
        with the student and teacher in float64 (the ground truth for both)."""

        first = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.first is None:
                params = [p for p in model.parameters() if p.requires_grad]
                results = []
                for fn in (SDPOTrainer.compute_loss, FusedSDPOTrainer.compute_loss, "float64"):
                    if fn == "float64":
                        for m in {model, self.teacher_model}:
                            m.double()  # in place and exactly undone below: the optimizer keeps its tensors
                        fn = SDPOTrainer.compute_loss
                    loss = fn(self, model, inputs)
                    results.append((loss.detach().double(), [g.double() for g in torch.autograd.grad(loss, params)]))
                for m in {model, self.teacher_model}:
                    m.float()
                self.first = results, [name for name, p in model.named_parameters() if p.requires_grad]
                self.clipped = inputs.get("old_per_token_logps") is not None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return FusedSDPOTrainer, FirstStepChecked


@pytest.fixture(scope="module")
def tiny_model_dir(tokenizer, tmp_path_factory):
    from opcod.tiny import create_model_dir, tiny_config
    return create_model_dir(tmp_path_factory.mktemp("sdpo-model"), tokenizer, tiny_config(len(tokenizer)))


def reward(prompts, completions, **kwargs):
    # Every other rollout "succeeds", so teachers get both a demonstration and feedback.
    return [float(i % 2) for i in range(len(prompts))]


@pytest.mark.parametrize("mode, alpha, topk, tail, temperature, clip", [
    ("full_logits", 0.5, None, False, 1.0, False),
    ("topk_logits", 1.0, 8, True, 0.8, True),
])
def test_trl_sdpo_trains_on_fused_linear_jsd(tokenizer, tiny_model_dir, tmp_path, mode, alpha, topk, tail,
                                             temperature, clip):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.experimental.sdpo import SDPOConfig
    _, FirstStepChecked = trainer_classes()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["What is the molar mass of water?", "Which unit measures force?", "Reason step by step.",
               "Correct the solution."]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts],
                                 "privileged_context": ["It is 18.02 g/mol.", "Newtons.", "", "Check the units."]})
    args = SDPOConfig(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=0, save_strategy="no", logging_steps=1,
        learning_rate=1e-3, per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=3, temperature=temperature, include_environment_feedback=True, distillation_mode=mode,
        distillation_alpha=alpha, distillation_topk=topk, distillation_add_tail=tail,
        # steps_per_generation 2: the rollout's own log-probs exist, so the clipped ratio applies
        steps_per_generation=2 if clip else None)
    trainer = FirstStepChecked(model, reward_funcs=reward, args=args, train_dataset=dataset,
                               processing_class=tokenizer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer.train()

    ((theirs, g_theirs), (ours, g_ours), (truth, g_truth)), names = trainer.first
    assert trainer.clipped == clip  # the clipped importance ratio took part where asked
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    print(f"loss: TRL {theirs.item():.6e}, fused {ours.item():.6e}, TRL float64 {truth.item():.6e}; rel. to "
          f"float64: TRL {rel(theirs, truth):.1e} fused {rel(ours, truth):.1e}; gradients: TRL "
          f"{rel(flat(g_theirs), flat(g_truth)):.1e} fused {rel(flat(g_ours), flat(g_truth)):.1e}")
    # The trainer's own loss in float64 is the reference. Its default fp32 run differs from it by its
    # rounding, which with a teacher this close to the student is large: measured here (loss, grads)
    # 1.1e-4, 7.6e-3 (full_logits) and 2.0e-2, 1.3e-1 (topk_logits); the fused loss 3e-8, 4e-7 and 9e-7, 2e-6.
    assert truth > 0 and rel(ours, truth) <= 1e-5 and rel(flat(g_ours), flat(g_truth)) <= 1e-5
    assert rel(theirs, truth) >= rel(ours, truth) and rel(ours, theirs) <= 5e-2  # the same objective
    for name, a, b in zip(names, g_ours, g_truth):  # each tensor that gets a real gradient
        if b.norm() > 1e-3 * flat(g_truth).norm():
            assert rel(a, b) <= 1e-3, name
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())
    assert any(e.get("self_distillation/distillation_loss", 0) > 0 for e in trainer.state.log_history)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_trls_generalized_jsd_loss_is_jsd_with_labels(beta):
    """TRL's GKD loss (generalized_jsd_loss, 'batchmean' over labels != -100, or divided by
    num_items_in_batch) is jsd with labels and the same beta and temperature on both sides."""
    from trl.experimental.gkd import GKDTrainer
    from opcod_kernels import jsd
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 2
    t = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[:, :2] = -100
    a = s.float().requires_grad_()
    ours = jsd(a.flatten(0, 1), t.float().flatten(0, 1), labels=labels.flatten(), beta=beta,
               student_temperature=1.5, teacher_temperature=1.5)
    ours.backward()
    b = s.clone().requires_grad_()
    theirs = GKDTrainer.generalized_jsd_loss(b, t, labels=labels, beta=beta, temperature=1.5)
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()
    assert ((a.grad.double() - b.grad).norm() / b.grad.norm()).item() <= 1e-5
    summed = jsd(s.float().flatten(0, 1), t.float().flatten(0, 1), labels=labels.flatten(), beta=beta,
                 student_temperature=1.5, teacher_temperature=1.5, reduction="sum") / 40
    with_items = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.5,
                                                 num_items_in_batch=40)
    assert abs(summed.item() - with_items.item()) <= 1e-5 * with_items.item()
