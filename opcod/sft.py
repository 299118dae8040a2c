"""torchrun -m opcod.sft: supervised fine-tuning (full or LoRA) on response tokens, on FSDP2."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from . import cli, prompts
from .checkpoint import export_hf
from .config import ConfigError, LoRAConfig, SFTConfig, load_config, save_config
from .data import DataError, read_jsonl
from .models import check_model_dir, load_student, load_tokenizer
from .step import pack


def read_records(path: str) -> list[dict]:
    """{"messages": [{"role", "content"}...], "response": str} per line; bad lines are named."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data: {path!r} does not exist")
    out = []
    for lineno, rec in read_jsonl(path):
        msgs, resp = rec.get("messages"), rec.get("response")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                         for m in msgs)):
            raise DataError(f"{path}:{lineno}: 'messages' must be a list of {{role, content}} objects")
        if not isinstance(resp, str) or not resp:
            raise DataError(f"{path}:{lineno}: 'response' must be a non-empty string")
        out.append(rec)
    if not out:
        raise DataError(f"{path}: no records")
    return out


def encode(records: list[dict], tokenizer, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos); the response is cut to fit, never the templated prompt."""
    out = []
    for rec in records:
        p = tokenizer.encode(prompts.render(tokenizer, rec["messages"]), add_special_tokens=False)
        r = tokenizer.encode(rec["response"], add_special_tokens=False) + [tokenizer.eos_token_id]
        room = max_tokens - len(p)
        if room > 0:
            out.append((p, r[:room]))
    return out


def epoch_batches(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of example indices: a seeded shuffle, with group_by_length sorted by
    length within windows of 8 batches and the batches shuffled again (the short one stays last)."""
    rng = random.Random(seed)
    order = rng.sample(range(len(lengths)), len(lengths))
    if not group_by_length:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    window = 8 * batch_size
    order = [i for w in range(0, len(order), window)
             for i in sorted(order[w:w + window], key=lambda i: lengths[i], reverse=True)]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    whole = [b for b in batches if len(b) == batch_size]
    rng.shuffle(whole)
    return whole + [b for b in batches if len(b) < batch_size]


def micro_batches(share: list, size: int) -> list[list]:
    """A rank's share of a batch in micro-batches of `size` records (0: one), longest first: each
    is padded only to its own longest record."""
    if size <= 0 or size >= len(share):
        return [share]
    share = sorted(share, key=lambda e: len(e[0]) + len(e[1]), reverse=True)
    return [share[s:s + size] for s in range(0, len(share), size)]


def run_sft(cfg: SFTConfig, log=print) -> Path:
    """Fine-tune cfg.model on cfg.data and write cfg.output; runs inside an initialised process group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    check_model_dir(cfg.model, "model")
    tokenizer = load_tokenizer(cfg.model, "model")
    examples = encode(read_records(cfg.data), tokenizer, cfg.max_tokens)
    if cfg.batch_size % world:
        raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by {world} processes")
    if cfg.micro_batch_size < 0:
        raise ConfigError(f"config key 'micro_batch_size' must be >= 0 (0: a rank's whole share), got {cfg.micro_batch_size}")

    torch.manual_seed(cfg.seed)
    student = load_student(cfg.model, device, LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
                           reshard_after_forward=cfg.reshard_after_forward)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    warmup = max(1, math.ceil(cfg.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                              0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    step = 0
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"sft {Path(cfg.data).stem}", unit="step", leave=False)
    lengths = [len(p) + len(r) for p, r in examples]
    for epoch in range(cfg.epochs):
        running = 0.0
        for indices in epoch_batches(lengths, cfg.batch_size, cfg.seed * 1000 + epoch, cfg.group_by_length):
            batch = [examples[i] for i in indices]
            # grouped by length, the ranks' interleaved shares are about equally long: none waits
            mine = batch[rank::world] or batch[:1]  # a short last batch still gives every rank work
            weight = 1.0 if batch[rank::world] else 0.0
            tokens = torch.tensor(float(sum(len(r) for _, r in batch)), device=device)
            loss = 0.0
            chunks = micro_batches(mine, cfg.micro_batch_size)
            for n, chunk in enumerate(chunks):
                ids, mask, index = pack(chunk, tokenizer.pad_token_id, device)
                targets = torch.tensor([t for _, r in chunk for t in r], device=device)
                part = student(ids, mask, index, targets=targets) * weight / tokens
                # gradients are reduced across ranks once per batch, after its last micro-batch
                student.set_requires_gradient_sync(n == len(chunks) - 1)
                (part * world).backward()  # FSDP2 averages over ranks; the loss is normalised globally
                loss = loss + part.detach()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            logged = loss.detach().clone()
            dist.all_reduce(logged)  # per-rank partial sums of the global token mean
            running += float(logged)
            step += 1
            if bar is not None:
                bar.update(1)
        if rank == 0:
            log(f"sft epoch {epoch + 1}/{cfg.epochs}: mean token loss {running / per_epoch:.4f}")
    if bar is not None:
        bar.close()
    export_hf(student, tokenizer, Path(cfg.output))  # a LoRA student merged, its adapter in output/adapter
    return Path(cfg.output)


def build_parser():
    ap = cli.parser("torchrun -m opcod.sft", __doc__)
    cli.add_config_args(ap, "a YAML file of SFTConfig keys, e.g. configs/sft/physics.yaml")
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=SFTConfig)
    except ConfigError as exc:
        print(f"opcod.sft: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        cli.print_config(cfg)
        return 0
    from .distributed import init_distributed, quiet_transformers
    quiet_transformers()
    init_distributed()
    try:
        from .hub import resolve_all
        cfg.model = resolve_all([(cfg.model, "model")])[0]  # model=Qwen/Qwen3-8B: from the Hub cache
        out = run_sft(cfg)
        if dist.get_rank() == 0:
            save_config(cfg, out / "sft_config.yaml")
            print(f"wrote {out}")
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"opcod.sft: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
