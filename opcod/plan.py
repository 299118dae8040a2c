"""python -m opcod.plan --config FILE [key=value ...] [--gpu-gib G] [--gpus N]: the per-GPU memory
plan of a run, from the students' config.json alone (no weights read).

What is counted is what opcod allocates, phase by phase (see the table it prints): the trainer's
fp32 master weights of every student (FSDP shards), the tutee's gradients and AdamW state (an idle
student's optimizer state and the tutor snapshots wait in pinned host memory), teacher copies,
FSDP's unsharded buffers, activations of one micro-batch at the configured lengths (every sequence
as long as the config allows), the loss kernel's workspace, the optimizer step's temporaries, each
engine's share while it is awake and its process's memory outside that share, every weight push
(the trainer's gathered tensor, the bucket, the engine's woken weights and its received copies),
and the CUDA contexts. The peak is the largest phase. Figures are estimates from shapes and a few
constants; benchmarks/gpu_check.sh measures the trainer's parts at Qwen3-8B width (fewer layers)
beside this plan when a GPU is lent, and docs/memory.md says which constants are still unmeasured.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import cli
from .config import Config, ConfigError, load_config

GIB = 1 << 30
H200_GIB = 140.0                 # an H200 as torch reports it: 143,771 MiB
# Unmeasured until a GPU run records them (benchmarks/gpu_check.sh prints the trainer's context;
# an engine's needs vLLM on the GPU): see docs/memory.md.
CUDA_CONTEXT_GIB = 1.0           # a process's CUDA context, cuBLAS workspace and NCCL buffers
# A vLLM engine process outside its gpu_memory_utilization budget, awake or asleep: vLLM takes its
# memory snapshot after the process's CUDA context and NCCL exist, so they are not in the budget,
# and sleeping releases only its pools.
ENGINE_ASLEEP_GIB = 1.0
KERNEL_BUDGET_BYTES = 768 << 20  # opcod_kernels' CUDA logits workspace per chunk
TEMPLATE_TOKENS = 64             # chat template and reprompt text around the teacher's context


@dataclass
class Shape:
    """What the plan needs of a model: its sizes, read from config.json."""
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    max_positions: int = 0

    @classmethod
    def from_config(cls, path: Path) -> "Shape":
        try:
            c = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist (the plan reads each student's config.json)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON ({exc})") from None
        try:
            heads = c["num_attention_heads"]
            return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                       intermediate=c["intermediate_size"], heads=heads,
                       kv_heads=c.get("num_key_value_heads", heads),
                       head_dim=c.get("head_dim") or c["hidden_size"] // heads,
                       tied=bool(c.get("tie_word_embeddings", False)),
                       max_positions=int(c.get("max_position_embeddings", 0)))
        except KeyError as exc:
            raise ConfigError(f"{path}: no {exc.args[0]!r} (a decoder-only Hugging Face config is expected)") from None

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * (q + 2 * kv) + q * h + 3 * h * self.intermediate + 2 * h + 2 * self.head_dim

    @property
    def root_params(self) -> int:
        """Embedding, final norm and (untied) lm_head: the root FSDP group."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.root_params

    def lora_params(self, rank: int, targets) -> int:
        """LoRA parameters, rank x (in + out) per adapted projection of every layer; targets as PEFT's
        target_modules ("all-linear": all seven projections, never the lm_head)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
                 "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
        names = set(sizes) if targets == "all-linear" else set(targets if isinstance(targets, list) else [targets])
        chosen = {k: v for k, v in sizes.items() if k in names}
        return self.layers * rank * sum(chosen.values())

    def layer_activation_elems(self) -> int:
        """Elements per token that one decoder layer keeps for its backward (bf16, flash attention):
        norms, q/k/v and their norms, attention output, the MLP's gate, up, activation and product."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 6 * h + 3 * q + 4 * kv + 4 * self.intermediate


@dataclass
class Part:
    name: str
    gib: float
    key: str            # the config key that shrinks it ("" when none does)
    phases: tuple[str, ...]
    owner: str = "trainer"  # "trainer" (this process's allocations) | "engine" (the vLLM processes)


@dataclass
class Plan:
    gpu_gib: float
    gpus: int
    shape: Shape
    parts: list[Part] = field(default_factory=list)
    host_gib: float = 0.0

    def phase_total(self, phase: str) -> float:
        return sum(p.gib for p in self.parts if phase in p.phases)

    @property
    def phases(self) -> list[str]:
        return list(dict.fromkeys(ph for p in self.parts for ph in p.phases))

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def peak_gib(self) -> float:
        return self.phase_total(self.peak_phase)

    @property
    def fits(self) -> bool:
        return self.peak_gib <= self.gpu_gib

    def key_to_change(self) -> str:
        """The key of the largest part of the peak phase that a key shrinks."""
        phase = self.peak_phase
        keyed = [p for p in self.parts if phase in p.phases and p.key]
        return max(keyed, key=lambda p: p.gib).key if keyed else "--nproc_per_node"

    def table(self) -> str:
        phases = self.phases
        w = max(len(p.name) for p in self.parts) + 1
        head = f"{'part':<{w}}" + "".join(f"{ph:>11}" for ph in phases) + "  key"
        lines = [f"memory plan per GPU ({self.gpus} GPUs, {self.shape.params / 1e9:.2f} B parameters per student)",
                 head, "-" * len(head)]
        for p in self.parts:
            cells = "".join(f"{p.gib:>11.1f}" if ph in p.phases else f"{'':>11}" for ph in phases)
            lines.append(f"{p.name:<{w}}{cells}  {p.key}")
        lines.append(f"{'total (GiB)':<{w}}" + "".join(f"{self.phase_total(ph):>11.1f}" for ph in phases))
        lines.append(f"host memory per rank: {self.host_gib:.1f} GiB (pinned: idle optimizer state, "
                     "tutor snapshots, each sleeping vLLM engine's weights)")
        return "\n".join(lines)


def make_plan(cfg: Config, gpus: int, gpu_gib: float = H200_GIB) -> Plan:
    """The plan of `cfg` on `gpus` GPUs (one rank per GPU) of `gpu_gib` each."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if not cfg.students:
        raise ConfigError("config key 'students' is empty: the plan reads each student's config.json")
    shapes = [Shape.from_config(Path(s.path) / "config.json") for s in cfg.students]
    for i, s in enumerate(shapes[1:], 1):
        if s != shapes[0]:
            raise ConfigError(f"students.{i}.path: its architecture differs from students.0's "
                              "(the engines load every student into one architecture)")
    m, S, W = shapes[0], len(cfg.students), gpus
    P, H, V = m.params, m.hidden, m.vocab
    compute = 2 if cfg.model.dtype in ("auto", "bf16", "bfloat16") else 4
    engine_bytes = compute if cfg.engine.dtype == "auto" else (2 if cfg.engine.dtype in ("bf16", "bfloat16") else 4)
    opcod = cfg.method == "opcod"
    separate = opcod and cfg.engine.tutor == "separate"
    engines = 2 if separate else 1
    lora = cfg.model.lora
    # What the optimizer trains: every weight, or the LoRA adapters (their base frozen, no dW).
    T = m.lora_params(lora.rank, lora.target_modules) if lora.rank else P
    teachers = S if (cfg.loss.teacher_weights != "current" or (cfg.method == "grpo" and cfg.loss.grpo_kl > 0)) else 0
    if lora.rank and cfg.loss.teacher_weights != "ema":
        teachers = 0   # the initial teacher / KL reference is the student with its adapters off
    B = cfg.model.micro_batch_size
    # Every sequence of the micro-batch as long as the config allows (pack() pads to the longest).
    response = cfg.rollout.max_new_tokens
    student_len = max(response + 1, cfg.engine.max_model_len or m.max_positions)
    teacher_len = student_len + (cfg.loss.max_solution_tokens + cfg.loss.max_feedback_tokens + TEMPLATE_TOKENS
                                 if cfg.method != "grpo" else 0)
    rows = B * response                          # response tokens of one micro-batch: the kernel's N

    plan = Plan(gpu_gib, W, m)
    vllm = cfg.engine.kind == "vllm"
    # Phases: the engines generate (rollouts, feedback); with a separate vLLM tutor engine, the
    # tutor's weights are pushed while the rollout engine is still awake ("tutor sync"); the
    # teacher's no-grad forward of a micro-batch; the student's forward and backward; the optimizer
    # step; a push of new weights into a sleeping engine ("sync": after each update, and for every
    # evaluated student, while the last tutee's AdamW state is on the device).
    tutor_sync = ("tutor sync",) if separate and vllm else ()
    every = ("generate", *tutor_sync, "teacher", "student", "optimizer", "sync")
    update = ("teacher", "student")
    pushes = ("sync", *tutor_sync)

    def add(name, nbytes, key, phases=every, owner="trainer"):
        plan.parts.append(Part(name, nbytes / GIB, key, phases, owner))

    add(f"trainer weights: {S} students, fp32 shards" + (" (+ LoRA)" if lora.rank else ""),
        S * (P + (T if lora.rank else 0)) * 4 / W, "--nproc_per_node")
    if teachers:
        add(f"teacher copies ({cfg.loss.teacher_weights}), fp32 shards",
            teachers * (P + (T if lora.rank else 0)) * 4 / W, "loss.teacher_weights")
    add("tutee's AdamW state, fp32 shards", 2 * T * 4 / W, "--nproc_per_node")
    add("tutee's gradients, fp32 shards", T * 4 / W, "--nproc_per_node", (*update, "optimizer"))
    add("FSDP unsharded params (root + 2 layers)", (m.root_params + 2 * m.layer_params) * compute, "", update)
    if not lora.rank:  # a frozen root has no gradients to reduce
        add("FSDP root reduce-scatter (grads + fp32 copy)", m.root_params * (compute + 4), "", ("student",))
    tokens = B * student_len
    per_layer = tokens * m.layer_activation_elems() * compute
    if cfg.model.activation_checkpointing:
        # Layer inputs are kept; in backward one layer is recomputed and its gradients formed.
        add(f"activations: {B} x {student_len} tokens, layer inputs", m.layers * tokens * H * compute,
            "model.micro_batch_size", ("student",))
        add("activations: one layer recomputed + its backward", 1.5 * per_layer, "model.micro_batch_size",
            ("student",))
    else:
        add(f"activations: {B} x {student_len} tokens, every layer", m.layers * per_layer,
            "model.activation_checkpointing", ("student",))
    add(f"teacher forward: one layer at {B} x {teacher_len} tokens",
        B * teacher_len * m.layer_activation_elems() * compute, "model.micro_batch_size", ("teacher",))
    add("loss kernel: hidden rows (student, teacher, dH)", rows * H * compute * 3, "model.micro_batch_size",
        ("student",))
    add("loss kernel: logits chunk" + ("" if lora.rank else ", dW fp32 + its copy"),
        KERNEL_BUDGET_BYTES + (0 if lora.rank else V * H * (4 + compute)), "", ("student",))
    # AdamW's foreach step makes one fp32 temporary the size of the state it updates (sqrt of the
    # second moment) next to the gradients.
    add("optimizer step: foreach temporary, fp32 shards", T * 4 / W, "--nproc_per_node", ("optimizer",))
    largest = max(V * H, m.intermediate * H)
    add("sync: one gathered tensor, fp32 + engine dtype", largest * (4 + engine_bytes), "", pushes)
    add("CUDA context (trainer)", CUDA_CONTEXT_GIB * GIB, "")
    if vllm:  # the hf engine and its bucket live in host memory
        bucket = max(cfg.engine.bucket_mb << 20, largest * engine_bytes)
        add(f"weight-sync buckets ({engines} x {bucket / GIB:.2f} GiB)", engines * bucket, "engine.bucket_mb")
        share = cfg.engine.gpu_memory_utilization * gpu_gib * GIB
        add(f"vLLM processes outside their budget ({engines} x context)", engines * ENGINE_ASLEEP_GIB * GIB,
            "", owner="engine")
        add(f"vLLM engines awake ({engines} x {cfg.engine.gpu_memory_utilization:g} of the GPU)", engines * share,
            "engine.gpu_memory_utilization", ("generate",), owner="engine")
        # A push wakes the receiving engine's weights alone (its KV cache sleeps); the worker clones
        # one bucket and vLLM's layerwise reload materialises the layer being loaded beside it.
        receive = bucket + largest * engine_bytes
        add("engine's weights, woken for a push", P * engine_bytes, "", pushes, owner="engine")
        add("engine's received copies: a bucket + one layer", receive, "engine.bucket_mb", pushes, owner="engine")
        if separate:
            add(f"rollout engine awake ({cfg.engine.gpu_memory_utilization:g} of the GPU)",
                share, "engine.gpu_memory_utilization", tutor_sync, owner="engine")
    host = (S - 1) * 2 * T * 4 / W + (S * P * engine_bytes / W if opcod and cfg.tutor_snapshot == "round_start" else 0)
    if vllm:  # an engine asleep at level 1 keeps its weights in host memory
        host += engines * P * engine_bytes
    plan.host_gib = host / GIB
    return plan


def check_fits(cfg: Config, world: int) -> Plan:
    """Refuse, before any compute, a CUDA run whose plan does not fit this GPU."""
    import torch
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    plan = make_plan(cfg, world, total)
    if not plan.fits:
        raise ConfigError(f"the memory plan needs {plan.peak_gib:.1f} GiB per GPU in its '{plan.peak_phase}' phase, "
                          f"the GPU has {total:.1f} GiB; change {plan.key_to_change()} "
                          f"(python -m opcod.plan shows the whole plan)")
    return plan


def build_parser():
    ap = cli.parser("python -m opcod.plan", __doc__.split("\n\n")[0])
    cli.add_config_args(ap, "a run config (YAML)", required=True)
    ap.add_argument("--gpu-gib", type=float, default=H200_GIB, help=f"memory per GPU ({H200_GIB:g}: an H200)")
    ap.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", 2)),
                    help="GPUs, one rank each (default: WORLD_SIZE, else 2)")
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            cli.print_config(cfg)
            return 0
        from .hub import resolve_students
        resolve_students(cfg, files=["config.json"])  # by Hub id: the sizes are all a plan reads
        plan = make_plan(cfg, args.gpus, args.gpu_gib)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"opcod.plan: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    print(f"peak phase: {plan.peak_phase}")
    if not plan.fits:
        print(f"does not fit: change {plan.key_to_change()}")
    print(f"peak per GPU: {plan.peak_gib:.1f} GiB of {args.gpu_gib:g} GiB")
    return 0 if plan.fits else 3


if __name__ == "__main__":
    sys.exit(main())
