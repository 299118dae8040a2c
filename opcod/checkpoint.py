"""Atomic distributed checkpoints (DCP) of the whole run, and Hugging Face exports of students."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict)

from .adapters import is_peft, merge_state_dict, save_adapter, scale_of

LATEST = "latest"
KEEP = 2


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest(ckpt_root: Path) -> Path | None:
    """The last whole checkpoint, or None."""
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    return path if (path / "train_state.json").is_file() else None


def save(ckpt_root: Path, tag: str, modules: dict, optimizers: dict, tensors: dict, train_state: dict) -> Path:
    """Write modules (name -> nn.Module), optimizers (name -> (module, optimizer)), extra sharded
    tensors and a JSON train state under ckpt_root/tag; it becomes visible only once whole."""
    final = ckpt_root / tag
    tmp = ckpt_root / f"{tag}.partial"
    if _rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {"modules": {k: get_model_state_dict(m) for k, m in modules.items()},
             "optim": {k: get_optimizer_state_dict(m, o) for k, (m, o) in optimizers.items()},
             "tensors": tensors}
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank0():
        (tmp / "train_state.json").write_text(json.dumps(train_state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _atomic_write_text(ckpt_root / LATEST, tag)
        whole = sorted((p for p in ckpt_root.iterdir() if p.is_dir() and not p.name.endswith(".partial")),
                       key=lambda p: p.stat().st_mtime)
        for old in whole[:-KEEP]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: Path, modules: dict, optimizers: dict, tensors: dict) -> dict:
    """Restore everything `save` wrote into the live objects; returns the train state."""
    state = {"modules": {k: get_model_state_dict(m) for k, m in modules.items()},
             "optim": {k: get_optimizer_state_dict(m, o) for k, (m, o) in optimizers.items()},
             "tensors": tensors}
    dcp.load(state, checkpoint_id=str(path))
    for k, m in modules.items():
        set_model_state_dict(m, state["modules"][k])
    for k, (m, o) in optimizers.items():
        # The state tensors were the optimizer's own, so DCP filled them in place where they live
        # (an idle student's on the host); set_optimizer_state_dict would move all of them onto the
        # parameters' device at once. Only the hyperparameters (the scheduled lr) are copied back.
        for group, saved in zip(o.param_groups, state["optim"][k]["param_groups"]):
            group.update({key: v for key, v in saved.items() if key != "params"})
    return json.loads((path / "train_state.json").read_text())


def save_hf(out_dir: Path, config, state_dict: dict, tokenizer, generation_config=None, extra=None) -> None:
    """A Hugging Face model directory (safetensors, config, tokenizer + chat template), written
    under a temporary name first; a tied lm_head is stored once, as transformers expects.
    extra(tmp_dir) writes more into it before it takes its name."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def export_hf(student, tokenizer, out_dir: Path) -> None:
    """The student in Hugging Face format, gathered to rank 0. A LoRA student is written merged, and
    its adapter beside it in PEFT's format (`out_dir/adapter`)."""
    sd = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank0():
        sd = {k.removeprefix("lm."): v for k, v in sd.items()}
        extra = None
        if is_peft(student.lm):
            peft_sd = sd
            extra = lambda tmp: save_adapter(student.lm, peft_sd, tmp / "adapter")  # noqa: E731
            sd = merge_state_dict(sd, scale_of(student.lm))
        # Keep the dtype the model was released in (bf16 for Qwen3), not the fp32 master copy.
        dtype = getattr(student.lm.config, "dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        save_hf(out_dir, student.lm.config, sd, tokenizer, getattr(student.lm, "generation_config", None), extra)
    _barrier()
