"""LoRA adapters on every linear layer of the decoder, and merging them back for export."""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, with the base frozen and B starting at zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype) * self.scale


def apply_lora(decoder_layers: nn.ModuleList, rank: int, alpha: float) -> int:
    """Wrap every nn.Linear inside the decoder layers; returns how many were wrapped."""
    count = 0
    for layer in decoder_layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))
                    count += 1
    return count


def merge_state_dict(sd: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict with each adapter folded into its base weight (W + scale B A)."""
    out = {}
    for key, value in sd.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        if ".base." in key:
            prefix = key.split(".base.")[0]
            if key.endswith(".base.weight"):
                # at least fp32 for the product (bf16 would round it), never below the weight's dtype
                acc = torch.promote_types(value.dtype, torch.float32)
                delta = sd[f"{prefix}.lora_B"].to(acc) @ sd[f"{prefix}.lora_A"].to(acc)
                value = (value.to(acc) + scale * delta).to(value.dtype)
            key = key.replace(".base.", ".")
        out[key] = value
    return out
