"""LoRA through PEFT: adapters on a student, its merged weights for engines and exports, the adapter files."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."


def attach(lm, rank: int, alpha: float, dropout: float, target_modules):
    """The PEFT-wrapped model: LoRA on `target_modules` ("all-linear": every linear layer but the
    lm_head), the base frozen, B at zero, so the wrapped model starts equal to `lm`."""
    import peft
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return peft.get_peft_model(lm, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=targets, bias="none"))


def is_peft(lm) -> bool:
    return hasattr(lm, "peft_config")


def scale_of(lm) -> float:
    cfg = lm.peft_config["default"]
    return cfg.lora_alpha / cfg.r


def merged(named: Iterable[tuple[str, torch.Tensor]], scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the plain model from PEFT-named full tensors: each adapted weight as
    W + scale * B @ A under the base layer's name. Tensors arrive one at a time (gathered shards)
    and a base weight waits only until its own A and B have come."""
    base, lora_a = {}, {}
    for name, t in named:
        name = name.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name:
            lora_a[name.split(".lora_A.")[0]] = t
        elif ".lora_B." in name:
            layer = name.split(".lora_B.")[0]
            w = base.pop(layer + ".weight")
            a = lora_a.pop(layer)
            acc = torch.promote_types(w.dtype, torch.float32)   # at least fp32 for the product
            yield layer + ".weight", (w.to(acc) + scale * (t.to(acc) @ a.to(acc))).to(w.dtype)
        elif ".base_layer." in name:
            layer, _, leaf = name.rpartition(".base_layer.")
            if leaf == "weight":
                base[layer + ".weight"] = t
            else:
                yield f"{layer}.{leaf}", t
        else:
            yield name, t
    if base or lora_a:
        raise ValueError(f"adapter weights without their pair: {sorted(base) + sorted(lora_a)}")


def merge_state_dict(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return dict(merged(sd.items(), scale))


def save_adapter(lm, sd: dict[str, torch.Tensor], out_dir: Path) -> None:
    """The adapter in PEFT's own format (adapter_config.json, adapter_model.safetensors) from a full
    state dict of the wrapped model (PEFT names): `PeftModel.from_pretrained(base, out_dir)` loads it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(lm, state_dict=sd)
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out_dir / "adapter_model.safetensors"))
    lm.peft_config["default"].save_pretrained(str(out_dir))


@contextmanager
def adapters_off(lm):
    """The base model's forward (the adapter-free teacher or KL reference); a no-op without PEFT."""
    if is_peft(lm):
        with lm.disable_adapter():
            yield
    else:
        yield
