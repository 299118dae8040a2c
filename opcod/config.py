"""The run configuration: one dataclass tree, read from YAML and key=value overrides, checked early."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("opcod", "sdpo", "grpo")
GATES = ("cognizance", "always", "never", "domain_selective")
TEACHER_WEIGHTS = ("current", "ema", "initial")
TUTOR_SNAPSHOTS = ("round_start", "latest")
ENGINES = ("hf", "vllm")
RESUME = ("auto", "force")
NORMALIZE = ("sequence", "token")
TRACKERS = ("jsonl", "tensorboard", "wandb", "trackio")
TUTOR_ENGINES = ("separate", "shared")
DATA_SOURCES = ("synthetic", "sciknoweval", "jsonl")


class ConfigError(ValueError):
    """A bad config key or value, named."""


@dataclass
class StudentConfig:
    name: str = "student"
    path: str = ""                      # a local Hugging Face model folder, or a Hub id (Qwen/Qwen3-8B)
    # The domain it was trained for (its stronger domain): where gate=domain_selective lets it tutor
    # while incognizant. Empty: the domains where it scores best on each round's validation split.
    domain: str = ""


@dataclass
class DataConfig:
    source: str = "synthetic"           # synthetic | sciknoweval | jsonl
    # sciknoweval: a SciKnowEval clone or its raw_data/, SDPO's split, a Hugging Face dataset id, or the
    # folder `python -m opcod.data prepare` wrote; jsonl: a folder of <domain>/{train,test}.jsonl
    path: str = ""
    domains: list[str] = field(default_factory=lambda: ["chemistry", "physics"])
    val_size: int = 16                  # per domain, carved out of train (a prepared validation.jsonl holds it)
    test_size: int = 0                  # per domain; 0 = the whole test split
    synthetic_train: int = 64           # per domain, synthetic source only
    synthetic_test: int = 24
    # The seed of the splits (synthetic problems, the validation carve-out) and of the demo students'
    # build: the run's `seed` varies training only, so runs of several seeds share data and students.
    split_seed: int = 0


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class LossConfig:
    beta: float = 0.5
    teacher_weights: str = "current"    # current | ema | initial
    ema_rate: float = 0.05
    allow_self_anchor: bool = False     # the rollout may be its own correct solution
    max_solution_tokens: int = 1024
    max_feedback_tokens: int = 512
    max_nonfinite_steps: int = 3        # consecutive skipped steps before the run stops
    normalize: str = "sequence"         # sequence: each sequence's token mean, averaged (Eq. 1, SDPO) | token
    topk: int | None = None             # SDPO's top-k distillation over this many tokens (null: exact loss)
    topk_tail: bool = True              # with topk: one bucket for the rest of the vocabulary (SDPO's add_tail)
    # method=grpo, with the values of SDPO's GRPO baseline (baseline_grpo.yaml and its run script):
    grpo_std_normalize: bool = False    # divide advantages by the group's std (SDPO: no)
    grpo_mini_batches: int = 4          # optimizer updates per batch (SDPO: 32 prompts in mini-batches of 8)
    grpo_clip_low: float = 0.2          # PPO ratio clip range [1 - low, 1 + high]
    grpo_clip_high: float = 0.28
    grpo_clip_dual: float = 3.0         # dual clip for negative advantages
    grpo_kl: float = 0.0                # KL to the initial policy (off, as in SDPO and the paper)


@dataclass
class EngineConfig:
    kind: str = "hf"                    # hf (CPU, transformers) | vllm (GPU)
    tutor: str = "separate"             # separate: a second engine holds the tutor | shared: one switches
    bucket_mb: int = 512
    dtype: str = "auto"                 # engine weights; auto = the trainer's compute dtype
    gpu_memory_utilization: float = 0.35  # vllm: each engine's share of the GPU (weights and KV cache)
    max_model_len: int = 0              # vllm: longest prompt + response; 0 = the model's own limit
    kv_cache_gib: float = 0.0           # vllm: a fixed KV cache size instead (vLLM's CPU build reads the share
    #                                     above as a share of host memory, so the CPU default is 0.25 GiB)


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])   # any of jsonl, tensorboard, wandb, trackio
    project: str = "opcod"              # the W&B / Trackio project; the run is named after run_name
    # Each OPCoD step, the tutee also re-answers its kept-feedback rollouts with the solution only and
    # with nothing in context: break- and fix-rates against those controls (three extra generations).
    feedback_effects: bool = False


@dataclass
class GradingConfig:
    # false: SDPO's reading, the text after the last <answer> up to a </answer> if one follows (a
    # truncated answer still scores); true: a closing </answer> is required.
    require_closing_tag: bool = False


@dataclass
class LoRAConfig:
    rank: int = 0                       # 0: train every weight; > 0: LoRA adapters through PEFT
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"   # PEFT's: every linear layer but the lm_head


@dataclass
class ModelConfig:
    dtype: str = "auto"                 # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = False
    trust_remote_code: bool = False
    micro_batch_size: int = 8           # rollouts per forward/backward
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class Config:
    method: str = "opcod"
    rounds: int = 2
    steps_per_phase: int = 4
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 4
    tau: float = 0.2
    gate: str = "cognizance"
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = "default"
    tutor_snapshot: str = "round_start"
    save_every: int = 0                 # also checkpoint every N steps within a phase (0: phase ends only)
    resume: str = "auto"                # auto: resume under the same config | force: accept safe key changes
    eval_k: int = 4                     # samples per problem for avg@k on test
    val_k: int = 4                      # samples per problem for the validation scores
    demo: bool = False                  # build the embedded demo students first (see opcod.demo)
    students: list[StudentConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: SamplingConfig = field(default_factory=SamplingConfig)
    evaluation: SamplingConfig = field(default_factory=lambda: SamplingConfig(0.6, 0.95, 64))
    feedback: SamplingConfig = field(default_factory=lambda: SamplingConfig(0.7, 0.95, 64))
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    grading: GradingConfig = field(default_factory=GradingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


@dataclass
class SFTConfig:
    """torchrun -m opcod.sft: supervised fine-tuning on (messages, response) records."""
    model: str = ""                     # base model folder (Hugging Face, safetensors), or a Hub id
    output: str = ""                    # where the fine-tuned model is written (HF format, LoRA merged)
    data: str = ""                      # JSON lines: {"messages": [...], "response": "..."}
    epochs: int = 3
    batch_size: int = 16                # sequences per optimizer step, over all ranks
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lora_rank: int = 8                  # 0: full fine-tuning
    lora_alpha: float = 16.0
    max_tokens: int = 2048
    seed: int = 0
    # Batches of records of about one length (each epoch's shuffled order sorted within windows of 8
    # batches, the batches shuffled again): a batch is padded to its longest record. On the demo's
    # build it cut the padded tokens by a fifth, but the chemistry student then scored 83.8 % on its
    # own domain's validation questions instead of 100 % (one build each): off by default.
    group_by_length: bool = False
    # FSDP2 frees each layer's gathered weights after its forward and gathers them again for the
    # backward; false keeps them gathered in between: one all-gather fewer per layer and step, for
    # the memory of the whole unsharded model (an epoch of the demo's tiny students: 28 % faster).
    reshard_after_forward: bool = True
    # Records per forward/backward on each rank (0: its whole share of a batch at once): gradients
    # accumulate over a batch's micro-batches and are reduced once, so a step is the same up to
    # float rounding in the activation memory of one micro-batch. Sorted by length, each is padded
    # to its own longest record only: 480 of the demo's domain records, one epoch on 2 CPU
    # processes, took 11.5 s at 4, 13.5 s whole and 14.7 s at 1 (a forward has its fixed cost).
    micro_batch_size: int = 0


def _build(cls, data, where: str):
    """Instantiate dataclass `cls` from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(hints[key], value, path)
    return cls(**kwargs)


def _coerce(tp, value, path):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key {path!r} must be a list, got {value!r}")
        return [_coerce(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 3e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"config key {path!r} must be a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"config key {path!r} must be {tp.__name__}, got {value!r}")
    return value


def _set(tree: dict, dotted: str, value, item: str) -> None:
    node = tree
    keys = dotted.split(".")
    for depth, key in enumerate(keys):
        where = ".".join(keys[:depth + 1])
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override {item!r}: {where!r} is not an existing list item")
            if last:
                node[int(key)] = value
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            if last:
                node[key] = value
            node = node[key]
        else:
            raise ConfigError(f"unknown config key {where!r} (in override {item!r})")


def load_config(path: str | None = None, overrides: list[str] = (), base: dict | None = None, cls=None):
    """Config from defaults, then `base`, then a YAML file, then `key=value` overrides."""
    cls = cls or Config
    tree: dict = dict(base or {})
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = _merge(tree, loaded)
    full = dataclasses.asdict(_build(cls, tree, ""))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _set(full, key.strip(), yaml.safe_load(raw) if raw else "", item)
    cfg = _build(cls, full, "")
    (validate if cls is Config else validate_sft)(cfg)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _choice(value, options, key):
    if value not in options:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(options)}, got {value!r}")


def validate(cfg: Config) -> None:
    """Value checks that need no files; paths are checked by the trainer before any compute."""
    _choice(cfg.method, METHODS, "method")
    _choice(cfg.gate, GATES, "gate")
    _choice(cfg.tutor_snapshot, TUTOR_SNAPSHOTS, "tutor_snapshot")
    _choice(cfg.loss.teacher_weights, TEACHER_WEIGHTS, "loss.teacher_weights")
    _choice(cfg.engine.kind, ENGINES, "engine.kind")
    _choice(cfg.engine.tutor, TUTOR_ENGINES, "engine.tutor")
    _choice(cfg.data.source, DATA_SOURCES, "data.source")
    _choice(cfg.resume, RESUME, "resume")
    if cfg.tau < 0:
        raise ConfigError(f"config key 'tau' must be >= 0, got {cfg.tau}")
    if not 0 <= cfg.loss.beta <= 1:
        raise ConfigError(f"config key 'loss.beta' must be in [0, 1], got {cfg.loss.beta}")
    _choice(cfg.loss.normalize, NORMALIZE, "loss.normalize")
    lora = cfg.model.lora
    if lora.rank < 0 or lora.alpha <= 0 or not 0 <= lora.dropout < 1:
        raise ConfigError(f"config key 'model.lora' needs rank >= 0, alpha > 0 and dropout in [0, 1), got {lora}")
    if not (isinstance(lora.target_modules, str) or (isinstance(lora.target_modules, list) and lora.target_modules
                                                     and all(isinstance(m, str) for m in lora.target_modules))):
        raise ConfigError("config key 'model.lora.target_modules' must be a module name pattern or a list of "
                          f"names, got {lora.target_modules!r}")
    if isinstance(lora.target_modules, list) and {"lm_head", "embed_tokens"} & set(lora.target_modules):
        raise ConfigError("config key 'model.lora.target_modules': lm_head and embed_tokens cannot be adapted (the "
                          "loss kernel reads the lm_head as a plain weight); adapt the decoder's projections")
    for i, name in enumerate(cfg.logging.report_to):
        _choice(name, TRACKERS, f"logging.report_to.{i}")
    if cfg.loss.topk is not None and (not isinstance(cfg.loss.topk, int) or isinstance(cfg.loss.topk, bool)
                                      or cfg.loss.topk < 1):
        raise ConfigError(f"config key 'loss.topk' must be null or an int >= 1, got {cfg.loss.topk!r}")
    if cfg.loss.grpo_mini_batches < 1:
        raise ConfigError(f"config key 'loss.grpo_mini_batches' must be >= 1, got {cfg.loss.grpo_mini_batches}")
    for key in ("rounds", "steps_per_phase", "prompts_per_step", "rollouts_per_prompt", "eval_k", "val_k"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.model.micro_batch_size < 1:
        raise ConfigError("config key 'model.micro_batch_size' must be >= 1")
    if not cfg.demo:
        if len(cfg.students) < 2:
            raise ConfigError("config key 'students' needs at least two students (name, path)")
        names = [s.name for s in cfg.students]
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'students': names repeat: {names}")
        for i, s in enumerate(cfg.students):
            if not s.path:
                raise ConfigError(f"config key 'students.{i}.path' is empty")
            if s.domain and s.domain not in cfg.data.domains:
                raise ConfigError(f"config key 'students.{i}.domain' ({s.domain!r}) is not one of data.domains "
                                  f"{cfg.data.domains}")
    if not cfg.data.domains:
        raise ConfigError("config key 'data.domains' is empty")


def validate_sft(cfg: SFTConfig) -> None:
    for key in ("model", "output", "data"):
        if not getattr(cfg, key):
            raise ConfigError(f"config key {key!r} is required")
    for key in ("epochs", "batch_size", "max_tokens"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lora_rank < 0:
        raise ConfigError(f"config key 'lora_rank' must be >= 0, got {cfg.lora_rank}")


def save_config(cfg, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)


if __name__ == "__main__":   # python -m opcod.config --markdown: docs/configuration.md
    import sys

    from opcod.config_doc import main
    sys.exit(main())
