"""Load a local open_clip model folder (hub layout) as the frozen CLIP query encoder.

    folder/open_clip_config.json   {"model_cfg": {...}, "preprocess_cfg": {"mean", "std", ...}}
    folder/open_clip_model.safetensors  (or open_clip_pytorch_model.bin / .pth)

The model is built by open_clip from model_cfg with the local weights (nothing downloads) and
wrapped in OpenClipAdapter, which speaks the transformers CLIPModel dialect the exporter, the
parity check and the trainer use (get_image_features / get_text_features / config). open_clip's
OpenAI BPE is converted to a `tokenizers` tokenizer (the same one transformers' CLIPTokenizer
builds), so the exported bundle and the ONNX runtime need no open_clip. Needs the [openclip] extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tokenizers import Tokenizer
from torch import nn

from kaizen.runtime.errors import BundleError, ExtraMissingError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
SOT, EOT, PAD = 49406, 49407, 0  # OpenAI BPE: <|startoftext|>, <|endoftext|>; open_clip pads with 0
INSTALL_HINT = "pip install 'kaizen-edge[openclip]'"


def is_openclip_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise ExtraMissingError(
            f"an open_clip CLIP query encoder needs the openclip extra ({err.name or 'open_clip'} is not "
            f"installed): {INSTALL_HINT}") from err
    return open_clip


class OpenClipAdapter(nn.Module):
    """An open_clip CLIP behind the transformers CLIPModel calls used by kaizen (features unnormalised)."""

    def __init__(self, model: nn.Module, projection_dim: int):
        super().__init__()
        self.model = model
        self.config = SimpleNamespace(
            projection_dim=int(projection_dim),
            text_config=SimpleNamespace(bos_token_id=SOT, eos_token_id=EOT, pad_token_id=PAD,
                                        max_position_embeddings=int(model.context_length)))

    def get_image_features(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        # open_clip's text tower is causal and pools at argmax(ids) (the EOT, the largest id), so
        # right padding never changes the result as long as it is 0: zero every masked position.
        if attention_mask is not None:
            input_ids = input_ids * attention_mask.to(input_ids.dtype)
        return self.model.encode_text(input_ids)


def openclip_tokenizer() -> Tokenizer:
    """open_clip's OpenAI BPE (bpe_simple_vocab_16e6.txt.gz) as a transformers-CLIP `tokenizers` Tokenizer."""
    _import_open_clip()
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): int(i) for tok, i in simple.encoder.items()}
    if vocab.get("<|startoftext|>") != SOT or vocab.get("<|endoftext|>") != EOT:
        raise BundleError("open_clip's BPE vocabulary is not the OpenAI CLIP one (SOT/EOT ids differ)")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges).backend_tokenizer


def _preprocess(conf: dict, model_cfg: dict) -> dict:
    from kaizen.runtime.preprocess import PreprocessConfig

    pc = conf.get("preprocess_cfg", {})
    size = pc.get("size") or model_cfg.get("vision_cfg", {}).get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise BundleError(f"open_clip image size {size} is not square; only square inputs are supported")
        size = size[0]
    default = PreprocessConfig(size=int(size))
    mode = pc.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise BundleError(f"open_clip resize_mode {mode!r} is not supported (use 'shortest' or 'squash')")
    interp = pc.get("interpolation", "bicubic")
    return dict(default.to_dict(), mean=tuple(pc.get("mean", default.mean)), std=tuple(pc.get("std", default.std)),
                resample=interp if interp in ("bicubic", "bilinear") else "bicubic",
                resize_mode="shortest_center_crop" if mode == "shortest" else "squash")


def load_openclip(path: Path):
    """(model adapter, tokenizer, preprocess dict, max_len) for an open_clip hub-layout folder."""
    try:
        conf = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path / CONFIG_FILE}: not valid JSON ({err})") from err
    model_cfg = conf.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise BundleError(f"{path / CONFIG_FILE} has no model_cfg: not an open_clip model folder")
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name") or model_cfg.get("custom_text"):
        raise BundleError(f"{path}: open_clip models with a custom or Hugging Face text tower are not supported "
                          "(only the OpenAI-BPE CLIP text transformer)")
    if int(text_cfg.get("vocab_size", 49408)) != 49408:
        raise BundleError(f"{path}: text vocab_size {text_cfg.get('vocab_size')} is not the OpenAI BPE's 49408")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise BundleError(f"{path} has no open_clip weights (expected one of {', '.join(WEIGHT_FILES)})")
    open_clip = _import_open_clip()
    model = open_clip.create_model(f"local-dir:{path}", precision="fp32", device="cpu",
                                   require_pretrained=True, output_dict=False).eval()
    model.requires_grad_(False)
    pool = getattr(model, "text_pool_type", "argmax")
    if pool != "argmax":
        raise BundleError(f"{path}: open_clip text_pool_type {pool!r} is not supported (only 'argmax')")
    adapter = OpenClipAdapter(model, model_cfg["embed_dim"]).eval()
    adapter.requires_grad_(False)
    return adapter, openclip_tokenizer(), _preprocess(conf, model_cfg), int(model.context_length)
