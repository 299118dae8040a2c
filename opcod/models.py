"""Students: a local Hugging Face model under FSDP2, its optimizer and LR schedule, teacher copies."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from opcod_kernels import fused_linear_jsd, fused_linear_logprobs

from .adapters import adapters_off, attach
from .prompts import check_chat_template


def check_model_dir(path: str, key: str) -> None:
    """Fail before any compute if `path` is not a local safetensors model directory."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{key}: model directory {path!r} does not exist")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {path!r} has no config.json (not a Hugging Face model directory)")
    if not list(p.glob("*.safetensors")):
        raise FileNotFoundError(f"{key}: {path!r} has no *.safetensors weights (only safetensors are read)")


def load_tokenizer(path: str, key: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    check_chat_template(tok, f"{key}: the tokenizer in {path!r}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
            "float32": torch.float32}[name]


def load_causal_lm(path: str, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    attn = "sdpa"
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401
            attn = "flash_attention_2"
        except ImportError:
            pass
    # fp32 master weights; FSDP2's mixed-precision policy casts to bf16 for compute on GPU.
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                                attn_implementation=attn,
                                                trust_remote_code=trust_remote_code)


class Student(nn.Module):
    """A causal LM whose forward returns final hidden states at chosen positions or, given teacher
    hidden states, the distillation loss. The loss runs inside this root module's forward so that
    FSDP2 has gathered the lm_head weight the kernel needs, and its gradient reaches the shard."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, index, teacher_hidden=None, token_weights=None,
                beta: float = 0.5, targets=None, policy=None, teacher_weight=None, topk=None, tail=True):
        # use_cache=False: transformers keeps every layer's keys and values in a cache unless told
        # not to (it turns the cache off itself only when checkpointing layers with gradients on),
        # so a teacher's no-grad forward would hold the whole KV of the micro-batch until it ends.
        h = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
        h = h.reshape(-1, h.shape[-1]).index_select(0, index)
        weight = self.lm.get_output_embeddings().weight
        if policy is not None:  # GRPO: log-probs of the sampled tokens, or the weighted token loss
            logp = fused_linear_logprobs(h, weight, targets)
            if policy == "logprobs":
                return logp
            args = dict(policy)
            weights = args.pop("weights")
            return (grpo_token_loss(logp, **args) * weights).sum()
        if targets is not None:  # SFT: summed cross-entropy, logits of the selected positions only
            logits = (h @ weight.T).float()
            return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        if teacher_hidden is None:
            return h
        return fused_linear_jsd(h, teacher_hidden.to(h.dtype), weight,
                                None if teacher_weight is None else teacher_weight.to(h.dtype), beta=beta,
                                token_weights=token_weights, reduction="sum", topk=topk, tail=tail)

    def output_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole lm_head weight (gathered from its shards), detached, in `dtype`: an EMA or
        initial teacher's own head for the loss kernel."""
        w = self.lm.get_output_embeddings().weight
        w = w.full_tensor() if hasattr(w, "full_tensor") else w
        return w.detach().to(dtype)


def grpo_token_loss(logp, advantages, old_logp=None, clip_low: float = 0.2, clip_high: float = 0.28,
                    clip_dual: float = 3.0, ref_logp=None, kl: float = 0.0):
    """Per-token PPO loss as verl computes it: max(-A r, -A clip(r, 1 - low, 1 + high)), and for
    A < 0 at most -A clip_dual (dual clip), r = exp(logp - logp_old); plus kl * (exp(ref - logp) -
    (ref - logp) - 1) towards a reference policy when kl > 0."""
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    loss = torch.where(advantages < 0, torch.minimum(clipped, -advantages * clip_dual), clipped)
    if kl > 0 and ref_logp is not None:
        delta = ref_logp - logp
        loss = loss + kl * (torch.exp(delta) - delta - 1)
    return loss


def shard(student: Student, device: torch.device, activation_checkpointing: bool = False,
          reshard_after_forward: bool = True) -> Student:
    """fully_shard every decoder layer, then the root (embeddings, final norm, lm_head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    student.to(device)
    layers = student.lm.get_decoder().layers
    if activation_checkpointing:
        # transformers' own per-layer checkpointing: its layers take keyword arguments that a
        # generic checkpoint wrapper would not pass through.
        student.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if device.type == "cuda" else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(student, mp_policy=mp)
    # from_pretrained returns eval mode, and transformers checkpoints layers only in training mode.
    return student.train()


def load_student(path: str, device: torch.device, lora=None, activation_checkpointing: bool = False,
                 trust_remote_code: bool = False, reshard_after_forward: bool = True) -> Student:
    """A student from a Hugging Face directory, with LoRA adapters through PEFT when lora.rank > 0,
    sharded with FSDP2 and in training mode."""
    lm = load_causal_lm(path, trust_remote_code)
    if lora is not None and lora.rank:
        lm = attach(lm, lora.rank, lora.alpha, lora.dropout, lora.target_modules)
    return shard(Student(lm), device, activation_checkpointing, reshard_after_forward)


def frozen_student(path: str, device: torch.device, trust_remote_code: bool = False, like: Student | None = None,
                   lora=None) -> Student:
    """A sharded student loaded from `path` again, without gradients: the EMA or initial teacher
    (the student's starting weights; FSDP2 refuses copy.deepcopy of a sharded module). With LoRA
    the twin carries adapters too, started equal to those of `like`."""
    twin = load_student(path, device, lora, trust_remote_code=trust_remote_code)
    if like is not None and lora is not None and lora.rank:
        with torch.no_grad():
            for pt, ps in zip(twin.parameters(), like.parameters()):
                if ps.requires_grad:
                    _local(pt).copy_(_local(ps))
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


class AdapterFree:
    """The student with its LoRA adapters off: its initial weights without a copy of them (B starts
    at zero), as TRL's trainers take the reference of a PEFT model. The teacher for
    loss.teacher_weights=initial and GRPO's KL reference when model.lora.rank > 0."""

    def __init__(self, student: Student):
        self.student = student

    def __call__(self, *args, **kwargs):
        with adapters_off(self.student.lm):
            return self.student(*args, **kwargs)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def ema_update(teacher: Student, student: Student, rate: float) -> None:
    """teacher <- (1 - rate) teacher + rate student, shard by shard, over what the student trains
    (everything, or its LoRA adapters: the frozen base is the same in both)."""
    for m in (teacher, student):  # the update is shard by shard: no module may hold gathered weights
        if hasattr(m, "reshard"):
            m.reshard()
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        if ps.requires_grad:
            lt, ls = _local(pt), _local(ps)
            lt.lerp_(ls.to(lt.dtype), rate)


def apply_update(student: nn.Module, opt: torch.optim.Optimizer, grad_clip: float) -> tuple[bool, float]:
    """Clip the gradients and step, unless their norm is not finite: then the gradients are dropped
    and nothing changes (as SDPO's actor does). Returns (stepped, grad norm)."""
    norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip, foreach=True)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    stepped = math.isfinite(grad_norm)
    if stepped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return stepped, grad_norm


def make_optimizer(student: Student, lr: float, weight_decay: float, betas, warmup_steps: int):
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay,
                            betas=tuple(betas), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
    return opt, sched


def _moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; a GPU tensor going to the host lands in pinned memory (copies overlap)."""
    if device.type == "cpu" and t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=True, copy=True)


def relocate(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of t (a DTensor keeps its mesh and placements) whose storage is on `device`."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        return DTensor.from_local(_moved(t.to_local(), device), t.device_mesh, t.placements,
                                  run_check=False, shape=t.shape, stride=t.stride())
    return _moved(t, device)


def storage_device(t: torch.Tensor) -> torch.device:
    from torch.distributed.tensor import DTensor
    return (t._local_tensor if isinstance(t, DTensor) else t).device


@torch.no_grad()
def move_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Offload (or bring back) a student's optimizer state while the other student trains.

    Each state tensor is replaced by one whose storage is on `device`: assigning `.data` on what
    DTensor.to_local() returns would move a temporary view and leave the state where it was."""
    for state in opt.state.values():
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.dim() > 0 and storage_device(value) != device:
                state[key] = relocate(value, device)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # pinned host copies are complete before anyone reads them


@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """AdamW's state (step 0, zero moments) created on `device` before the first step, as AdamW
    would create it itself: a checkpoint of a student that has not trained yet then writes this
    state instead of making torch.distributed.checkpoint materialise it on the GPU."""
    from torch.distributed.tensor import DTensor

    def zeros(p):
        if isinstance(p, DTensor):
            local = torch.zeros(p.to_local().shape, dtype=p.dtype, device=device)
            return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                      shape=p.shape, stride=p.stride())
        return torch.zeros(p.shape, dtype=p.dtype, device=device)
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # AdamW's choice
    for group in opt.param_groups:
        keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group.get("amsgrad") else [])
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state.update({k: zeros(p) for k in keys})
