"""LoRA machinery shared by the methods, in the exported decoder's own format.

The frozen base's target Linears are swapped once for `LoraSlot`s (kaizen.export.wrappers);
a method owns `LoraAdapter`s (A [r, in], B [out, r] per slot) and activates one or several of
them around a forward pass. Several adapters are summed by concatenating along the rank
((x A1^T) B1^T + (x A2^T) B2^T = (x [A1;A2]^T) [B1 B2]^T), which is how O-LoRA answers.

    slots = ensure_slots(base, DEFAULT_TARGETS)
    adapter = LoraAdapter(slots, rank=8, scale=2.0, generator=g)
    with activated(slots, [adapter]):
        logits = ...
    arrays = adapter.arrays()          # {"lora.0.q_proj.A": f32[r, in], ...}, scale folded into B
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kaizen.export.wrappers import ATTN_TARGETS, LoraSlot


@dataclass(frozen=True)
class Slots:
    """The LoraSlots of a base's language model, in export order, with their input names."""

    names: tuple[str, ...]  # "lora.{layer}.{target}"
    modules: tuple[LoraSlot, ...]


def ensure_slots(base, targets) -> Slots:
    """Swap the language model's target Linears for LoraSlots (idempotent, per target)."""
    lm = base.model.model.language_model
    names, modules = [], []
    for i, layer in enumerate(lm.layers):
        for t in targets:
            parent = layer.self_attn if t in ATTN_TARGETS else layer.mlp
            mod = getattr(parent, t)
            if not isinstance(mod, LoraSlot):
                assert isinstance(mod, nn.Linear), f"layer {i} {t} is {type(mod).__name__}, not Linear"
                mod = LoraSlot(mod)
                setattr(parent, t, mod)
            names.append(f"lora.{i}.{t}")
            modules.append(mod)
    return Slots(tuple(names), tuple(modules))


class LoraAdapter(nn.Module):
    """One LoRA set over `slots`: A [r, in] (kaiming-uniform init), B [out, r] (zeros)."""

    def __init__(self, slots: Slots, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        self.names = slots.names
        self.scale = float(scale)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for slot in slots.modules:
            n_in, n_out = slot.base.in_features, slot.base.out_features
            bound = 1.0 / math.sqrt(n_in)
            a = (torch.rand(rank, n_in, generator=generator) * 2 - 1) * bound
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(n_out, rank)))

    @property
    def rank(self) -> int:
        return int(self.A[0].shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """Decoder-input arrays: {"lora.{i}.{t}.A": f32[r, in], ".B": f32[out, r] * scale}."""
        out = {}
        for name, a, b in zip(self.names, self.A, self.B):
            out[f"{name}.A"] = a.detach().float().numpy().copy()
            out[f"{name}.B"] = (b.detach().float() * self.scale).numpy().copy()
        return out


def concat_arrays(adapters: list[LoraAdapter]) -> dict[str, np.ndarray]:
    """Sum of several adapters as ONE set (rank = sum of ranks): A stacked, B side by side."""
    parts = [a.arrays() for a in adapters]
    out = {}
    for key in parts[0]:
        axis = 0 if key.endswith(".A") else 1
        out[key] = np.concatenate([p[key] for p in parts], axis=axis)
    return out


@contextmanager
def activated(slots: Slots, adapters: list[LoraAdapter] | None):
    """Set every slot's A/B to the (summed) adapters for the duration of the block."""
    if not adapters:
        yield
        return
    try:
        for k, slot in enumerate(slots.modules):
            if len(adapters) == 1:  # a view, never the Parameter itself (the slot would register it)
                slot.A, slot.B = adapters[0].A[k].view_as(adapters[0].A[k]), adapters[0].B[k] * adapters[0].scale
            else:
                slot.A = torch.cat([a.A[k] for a in adapters], dim=0)
                slot.B = torch.cat([a.B[k] * a.scale for a in adapters], dim=1)
        yield
    finally:
        for slot in slots.modules:
            slot.A = slot.B = None


def count(params) -> int:
    return int(sum(p.numel() for p in params))
