"""The reference way in torch (transformers + peft, eager): same token layout as the engine.

Used by the export parity check, the engine parity tests, the trainer and bench/engine.py.

    embeds, mask = torch_inputs(base, pixel_values, ["Is the seal torn?"], prompt=P)
    tokens = torch_generate(model, base, embeds, mask, max_new_tokens=8)
"""

from __future__ import annotations

import numpy as np
import torch

from kaizen.runtime.prompting import prompt_ids

from . import query_whitening
from .loading import Base
from .wrappers import ATTN_TARGETS


def embed_prompt(model, base: Base, pixel_values: torch.Tensor, instructions: list[str],
                 prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (inputs_embeds, attention_mask); `prompt` [R, d] rows go right after BOS."""
    feats = image_features(model, pixel_values)
    return left_pad(request_rows(model, base, feats, instructions, prompt))


def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower + projector: pixels [B,3,H,W] -> image rows [B, N, d_model]."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    feats = inner.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def tower_features(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision tower alone -> (the rows the projector takes [B, N, d_vision], pooled output
    [B, d_vision]): LlavaModel.get_image_features's feature layer and CLS rule, for one layer."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config
    assert isinstance(cfg.vision_feature_layer, int), "multi-layer vision features are not supported"
    out = inner.model.vision_tower(pixel_values, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return feats, out.pooler_output


def vision_pass(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONE vision-tower pass -> (image rows [B, N, d_model], pooled image query [B, d_vision]).

    The rows equal `image_features` (LlavaModel.get_image_features for one feature layer); the
    query is the tower's pooled output (DINOv2: the layer-normed CLS; CLIP: post-layernorm CLS),
    the image query of unaligned query encoders, so a station needs no second image tower;
    whitened when the base has a query whitening (export/query_whitening.py).
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    feats, pooled = tower_features(inner, pixel_values)
    return inner.model.multi_modal_projector(feats), query_whitening.apply(inner, pooled)


def request_rows(model, base: Base, image_feats: torch.Tensor, instructions: list[str],
                 prompt=None) -> list[torch.Tensor]:
    """One unpadded embedding row [L_b, d] per request, from precomputed image rows [B, N, d].

    `prompt`: None, one [R, d] tensor for every request, or a list with one [R_b, d] tensor (or
    None) per request (the trainer's per-sample selected prompts). Rows go right after BOS.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    table = inner.get_input_embeddings()
    per_row = prompt if isinstance(prompt, (list, tuple)) else [prompt] * len(instructions)
    rows = []
    for b, text in enumerate(instructions):
        ids = torch.from_numpy(prompt_ids(base.tokenizer, base.spec, text))
        emb = table(ids)
        is_img = ids == base.spec.image_token_id
        emb = emb.masked_scatter(is_img[:, None], image_feats[b].to(emb.dtype))
        p = per_row[b]
        if p is not None and len(p):
            emb = torch.cat([emb[:1], p.to(emb.dtype), emb[1:]], dim=0)
        rows.append(emb)
    return rows


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack rows [L_b, d] left padded with zeros -> (embeds [B, L, d], attention_mask [B, L])."""
    length = max(len(r) for r in rows)
    embeds = torch.zeros(len(rows), length, rows[0].shape[1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        embeds[b, length - len(r):] = r
        mask[b, length - len(r):] = 1
    return embeds, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def torch_generate(model, base: Base, embeds, mask, max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy decoding with transformers' `generate` (the reference implementations' way)."""
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=base.spec.eos_token_id,
                         pad_token_id=base.spec.pad_token_id)
    result = []
    for row in out.tolist():
        toks = []
        for t in row:
            toks.append(t)
            if t == base.spec.eos_token_id:
                break
        result.append(toks)
    return result


def lora_target_regex(targets) -> str:
    return r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"


def apply_peft_lora(model, lora: dict[str, np.ndarray], rank: int, targets):
    """Wrap `model` with peft LoRA whose A/B equal the given decoder-input arrays (scale 1)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=lora_target_regex(targets),
                     bias="none")
    peft_model = get_peft_model(model, cfg)
    lm = peft_model.get_base_model().model.language_model
    for i, layer in enumerate(lm.layers):
        for t in targets:
            mod = getattr(layer.self_attn if t in ATTN_TARGETS else layer.mlp, t)
            mod.lora_A["default"].weight.data.copy_(torch.from_numpy(lora[f"lora.{i}.{t}.A"]))
            mod.lora_B["default"].weight.data.copy_(torch.from_numpy(lora[f"lora.{i}.{t}.B"]))
    return peft_model.eval()


def random_lora(shapes: dict, seed: int, scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(tuple(v)) * scale).astype(np.float32) for k, v in shapes.items()}
