"""Frozen bases: build the built-in tiny ones from a seed, load any local LLaVA checkpoint.

    kaizen base init --preset tiny-llama --out bases/tiny-llama     # writes DIR and DIR/clip
    base = load_base("bases/tiny-llama"); clip = load_clip("bases/tiny-llama/clip")

A base folder is a Hugging Face `LlavaForConditionalGeneration` checkpoint plus an optional
`kaizen_base.json` (prompt template, preprocessing, preset, LoRA targets: "lora": {"targets": [...]},
from the preset; a base without it has all 7, see kaizen.export.lora_targets). The CLIP query encoder is a separate
`CLIPModel` folder (`DIR/clip` for built-in bases). Everything loads with local_files_only=True.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kaizen.export.loading import DEFAULT_TEMPLATE, Base, Clip, load_base, load_clip  # noqa: F401 (re-exported)
from kaizen.runtime.preprocess import PreprocessConfig

from . import tokenizer as tk
from .presets import BasePreset, get_preset

TINY_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CLIP_MAX_LEN = 32


def build_models(preset: BasePreset, vocab_size: int, seed: int):
    """Construct (LlavaForConditionalGeneration, CLIPModel) of a preset, deterministic in `seed`."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2Config,
    )

    p = preset
    text_kw = dict(vocab_size=vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
                   num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                   max_position_embeddings=1024, bos_token_id=tk.BOS_ID, eos_token_id=tk.EOS_ID,
                   pad_token_id=tk.PAD_ID, tie_word_embeddings=False)
    text = LlamaConfig(**text_kw) if p.text_arch == "llama" else Qwen2Config(**text_kw)
    vision = CLIPVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_hidden * 4,
                              num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                              image_size=p.image_size, patch_size=p.patch)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tk.IMAGE_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu")
    clip_cfg = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=vocab_size, hidden_size=p.clip_hidden,
                                   intermediate_size=p.clip_hidden * 4, num_hidden_layers=p.clip_layers,
                                   num_attention_heads=4, max_position_embeddings=CLIP_MAX_LEN,
                                   bos_token_id=tk.BOS_ID, eos_token_id=tk.EOS_ID, pad_token_id=tk.PAD_ID),
        vision_config=CLIPVisionConfig(hidden_size=p.clip_hidden, intermediate_size=p.clip_hidden * 4,
                                       num_hidden_layers=p.clip_layers, num_attention_heads=4,
                                       image_size=p.clip_image_size, patch_size=p.patch),
        projection_dim=p.clip_dim,
    )
    torch.manual_seed(seed)
    vlm = LlavaForConditionalGeneration(cfg).eval()
    torch.manual_seed(seed + 1)
    clip = CLIPModel(clip_cfg).eval()
    return vlm, clip


def init_base(preset_name: str, out: str | Path, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Write a built-in base (random init from `seed`) to `out` and its CLIP to `out/clip`."""
    preset = get_preset(preset_name)
    if corpus is None:
        from .data.generic import corpus_text

        corpus = corpus_text()
    tok = tk.train_tokenizer(corpus, vocab_size=min(preset.vocab_size, 1024))
    vlm, clip = build_models(preset, vocab_size=preset.vocab_size, seed=seed)
    out = Path(out)
    (out / "clip").mkdir(parents=True, exist_ok=True)
    vlm.save_pretrained(str(out))
    clip.save_pretrained(str(out / "clip"))
    tk.save_hf_tokenizer(tok, out, model_max_length=1024)
    tk.save_hf_tokenizer(tok, out / "clip", model_max_length=CLIP_MAX_LEN)
    info = {"preset": preset.to_dict(), "seed": seed, "prompt_template": DEFAULT_TEMPLATE,
            "preprocess": PreprocessConfig(size=preset.image_size, **TINY_MEAN_STD).to_dict(),
            "pretrained": False, "lora": {"targets": list(preset.lora_targets)}}
    (out / "kaizen_base.json").write_text(json.dumps(info, indent=2))
    (out / "clip" / "kaizen_clip.json").write_text(json.dumps(
        {"preprocess": PreprocessConfig(size=preset.clip_image_size, **TINY_MEAN_STD).to_dict(),
         "max_len": CLIP_MAX_LEN}, indent=2))
    return out


def cli_init(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen base init", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-llama", help="tiny-llama | tiny-qwen2 | small")
    ap.add_argument("--out", required=True, help="folder to write the base into")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = init_base(a.preset, a.out, seed=a.seed)
    print(f"wrote base {a.preset} (seed {a.seed}) to {out} and its CLIP to {out / 'clip'}")
    return 0
