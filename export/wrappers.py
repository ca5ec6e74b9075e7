"""torch modules that give each exported graph its exact ONNX signature (see docs/ARCHITECTURE.md).

`add_lora_slots` swaps the language model's target Linear layers for `LoraSlot`s whose A/B are
plain tensors set per call, so the exported decoder takes every LoRA A/B as an input.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora_targets import ALL_TARGETS as DEFAULT_TARGETS  # noqa: F401  (the names live there, torch-free)
from .lora_targets import ATTENTION_TARGETS as ATTN_TARGETS


class LoraSlot(nn.Module):
    """y = base(x) + (x A^T) B^T, with A [r, in] and B [out, r] (scaling already folded into B)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None

    def forward(self, x):
        y = self.base(x)
        if self.A is not None:
            y = y + (x @ self.A.transpose(0, 1)) @ self.B.transpose(0, 1)
        return y


def lora_input_names(num_layers: int, targets) -> list[str]:
    return [f"lora.{i}.{t}.{ab}" for i in range(num_layers) for t in targets for ab in ("A", "B")]


def add_lora_slots(language_model: nn.Module, targets, rank: int) -> dict[str, tuple[int, ...]]:
    """Replace target Linears by LoraSlots in place; return {input name: shape} for every A/B."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, layer in enumerate(language_model.layers):
        for t in targets:
            parent = layer.self_attn if t in ATTN_TARGETS else layer.mlp
            lin = getattr(parent, t)
            assert isinstance(lin, nn.Linear), f"layer {i} {t} is {type(lin).__name__}, not Linear"
            setattr(parent, t, LoraSlot(lin))
            shapes[f"lora.{i}.{t}.A"] = (rank, lin.in_features)
            shapes[f"lora.{i}.{t}.B"] = (lin.out_features, rank)
    return shapes


def lora_slots(language_model: nn.Module, targets) -> list[LoraSlot]:
    out = []
    for layer in language_model.layers:
        for t in targets:
            parent = layer.self_attn if t in ATTN_TARGETS else layer.mlp
            out.append(getattr(parent, t))
    return out


class VisionWrapper(nn.Module):
    """pixel_values [B,3,H,W] -> image_features [B, N, d_model] (vision tower + projector), and with
    `with_query` also image_query [B, d_vision] (the tower's pooled output) from the same pass."""

    def __init__(self, llava, with_query: bool = False):
        super().__init__()
        self.llava = llava
        self.with_query = with_query

    def forward(self, pixel_values):
        # Same as LlavaModel.get_image_features for one feature layer, without its per-image
        # list (which would pin the batch size in the exported graph).
        from .reference import vision_pass

        feats, query = vision_pass(self.llava, pixel_values)
        return (feats, query) if self.with_query else feats


class DecoderWrapper(nn.Module):
    """(inputs_embeds, attention_mask, position_ids, past[2L], lora[2 per slot], logits_to_keep)
    -> (logits, present[2L]).

    `logits_to_keep` (int64 scalar, HF's meaning): the lm_head runs on the last N positions only, so
    logits is [B, N, V]; 0 (the exported default) or N >= S keeps every position. The KV cache
    (present) always covers every position."""

    def __init__(self, llava, targets):
        super().__init__()
        self.lm = llava.model.language_model
        self.head = llava.lm_head
        self.targets = tuple(targets)
        self.slots = lora_slots(self.lm, self.targets)

    def forward(self, inputs_embeds, attention_mask, position_ids, past, lora, logits_to_keep=None):
        from transformers import DynamicCache

        for k, slot in enumerate(self.slots):
            slot.A, slot.B = lora[2 * k], lora[2 * k + 1]
        n = len(past) // 2
        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n)],
                             config=self.lm.config)
        out = self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        for slot in self.slots:
            slot.A = slot.B = None
        hidden = out.last_hidden_state
        if logits_to_keep is not None:
            # A data-dependent slice: exported as ONNX Slice(starts=-N) (-0 = 0: every position;
            # a start before the first position clamps to it), not specialised to the example N.
            keep = logits_to_keep.clamp(min=0).item()
            torch._check(keep >= 0)
            hidden = hidden[:, -keep:]
        return (self.head(hidden), *present)


class ClipImageWrapper(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, pixel_values):
        out = self.clip.get_image_features(pixel_values=pixel_values)
        return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipTextWrapper(nn.Module):
    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask):
        out = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output if hasattr(out, "pooler_output") else out
