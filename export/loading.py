"""Load frozen bases offline: any local LLaVA checkpoint and a CLIP query encoder folder.

    base = load_base("bases/tiny-llama"); clip = load_clip("bases/tiny-llama/clip")
    base_fingerprint(base, clip)  # identity of the weights every pack is trained against

Lives in kaizen.export (not trainer) because both the exporter and the trainer load bases and
export may not import trainer. Everything loads with local_files_only=True: nothing downloads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from kaizen.runtime.errors import BundleError
from kaizen.runtime.preprocess import PreprocessConfig
from kaizen.runtime.prompting import PromptSpec

from . import query_whitening

DEFAULT_TEMPLATE = "USER: <image>\n{instruction}\nASSISTANT:"


@dataclass
class Base:
    """A loaded frozen VLM base: model (eval), tokenizer, prompt layout, preprocessing."""

    path: Path
    model: torch.nn.Module
    tokenizer: Tokenizer
    spec: PromptSpec
    preprocess: PreprocessConfig
    info: dict


@dataclass
class Clip:
    """A loaded frozen CLIP query encoder."""

    path: Path
    model: torch.nn.Module
    tokenizer: Tokenizer
    preprocess: PreprocessConfig
    max_len: int
    tokenizer_json: str | None = None  # set when there is no tokenizer.json file (open_clip: converted BPE)

    aligned = True  # image and text queries share one space: one key per task

    def tokenizer_bytes(self) -> bytes:
        if self.tokenizer_json is not None:
            return self.tokenizer_json.encode()
        return (self.path / "tokenizer.json").read_bytes()


@dataclass
class TextQuery:
    """Unaligned query encoders: a sentence encoder for the instruction (e.g. all-MiniLM-L6-v2);
    the image query is the base's own vision tower output (pooled CLS), from the same pass."""

    path: Path
    model: torch.nn.Module  # kaizen.export.text_encoder.SentenceEncoder: ids, mask -> unit embeddings
    tokenizer: Tokenizer
    max_len: int
    dim: int

    aligned = False

    def tokenizer_bytes(self) -> bytes:
        return (self.path / "tokenizer.json").read_bytes()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit text embeddings [n, dim] (the same ids the station's text_query.onnx sees)."""
        return torch.cat([self.model.encode(texts[i:i + 128]).float() for i in range(0, len(texts), 128)])


def load_query(base: Base, clip_dir: str | Path | None = None):
    """The base's query encoders: `kaizen_base.json` {"query": {"kind": "vision+text", "text": DIR}}
    -> TextQuery (DIR relative to the base folder); otherwise the CLIP at clip_dir (default BASE/clip)."""
    q = base.info.get("query") or {}
    if q.get("kind", "clip") == "clip":
        return load_clip(clip_dir or base.path / "clip")
    if q["kind"] != "vision+text":
        raise BundleError(f"{base.path}/kaizen_base.json: query.kind {q['kind']!r} is not 'clip' or 'vision+text'")
    if clip_dir:
        raise BundleError(f"{base.path} takes its image query from its own vision tower (query.kind "
                          "'vision+text'): drop --clip")
    from .text_encoder import load_sentence_encoder

    folder = base.path / q.get("text", "text_query")
    model, tokenizer, max_len = load_sentence_encoder(folder)
    model.eval().requires_grad_(False)
    return TextQuery(folder, model, tokenizer, max_len, int(model.layout.dim))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as err:
        raise BundleError(f"{path}: not valid JSON ({err}); fix or delete the file") from err


def _check_folder(path: Path, model_type: str, what: str) -> dict:
    cfg = path / "config.json"
    if not path.is_dir():
        raise BundleError(f"{what} folder {path} does not exist; run `kaizen base init` or pass a local checkpoint")
    if not cfg.exists():
        raise BundleError(f"{path} has no config.json: not a Hugging Face checkpoint folder")
    conf = _read_json(cfg, what)
    if conf.get("model_type") != model_type:
        raise BundleError(f"{path}/config.json has model_type {conf.get('model_type')!r}; "
                          f"a {what} must be a {model_type!r} checkpoint")
    if not (path / "tokenizer.json").exists():
        raise BundleError(f"{path} has no tokenizer.json (a fast tokenizer is required)")
    return conf


def load_base(path: str | Path) -> Base:
    """Load a local LLaVA checkpoint, offline, frozen, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    path = Path(path)
    conf = _check_folder(path, "llava", "LLaVA base")
    info = _read_json(path / "kaizen_base.json", "base info")
    model = LlavaForConditionalGeneration.from_pretrained(str(path), local_files_only=True,
                                                          dtype=torch.float32).eval()
    model.requires_grad_(False)
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    text = model.config.text_config
    vision = model.config.vision_config
    n_img = (vision.image_size // vision.patch_size) ** 2
    if model.config.vision_feature_select_strategy == "full":
        n_img += 1
    spec = PromptSpec(template=info.get("prompt_template", DEFAULT_TEMPLATE),
                      bos_token_id=int(text.bos_token_id if text.bos_token_id is not None else 1),
                      eos_token_id=int(text.eos_token_id), pad_token_id=int(text.pad_token_id or 0),
                      image_token_id=int(conf.get("image_token_id", conf.get("image_token_index"))),
                      num_image_tokens=n_img)
    pre = info.get("preprocess") or _hf_preprocess(path, vision.image_size)
    whitening = query_whitening.load(path, vision.hidden_size)  # BASE/query_whitening.npz, if any
    if whitening is None and (info.get("query") or {}).get("whitening"):
        raise BundleError(f"{path / query_whitening.FILE} is missing but {path}/kaizen_base.json says the base "
                          "whitens its image queries; copy the whole base folder again (or re-run "
                          "`kaizen base pretrain BASE --whiten-only`)")
    if whitening is not None:
        query_whitening.attach(model, *whitening)
    return Base(path, model, tokenizer, spec, PreprocessConfig.from_dict(pre), info)


def _hf_preprocess(path: Path, size: int) -> dict:
    """Preprocessing of a real LLaVA checkpoint from its preprocessor_config.json (CLIP defaults)."""
    pc = _read_json(path / "preprocessor_config.json", "preprocessor config")
    cfg = PreprocessConfig(size=size)
    return dict(cfg.to_dict(), mean=tuple(pc.get("image_mean", cfg.mean)), std=tuple(pc.get("image_std", cfg.std)),
                resize_mode="shortest_center_crop" if pc.get("do_center_crop") else "squash")


def load_clip(path: str | Path) -> Clip:
    """Load a local transformers CLIPModel folder (or open_clip hub-layout folder) as the frozen query encoder."""
    from transformers import CLIPModel

    path = Path(path)
    if (path / "open_clip_config.json").is_file():
        from .openclip import load_openclip

        model, tokenizer, pre, max_len = load_openclip(path)
        return Clip(path, model, tokenizer, PreprocessConfig.from_dict(pre), max_len, tokenizer.to_str())
    _check_folder(path, "clip", "CLIP query encoder")
    model = CLIPModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    model.requires_grad_(False)
    info = _read_json(path / "kaizen_clip.json", "clip info")
    pre = info.get("preprocess") or _hf_preprocess(path, model.config.vision_config.image_size)
    max_len = int(info.get("max_len", model.config.text_config.max_position_embeddings))
    return Clip(path, model, Tokenizer.from_file(str(path / "tokenizer.json")),
                PreprocessConfig.from_dict(pre), max_len)


def base_fingerprint(base: Base, clip) -> str:
    """sha256 over every weight of the VLM and the query encoder (Clip or TextQuery), the base's
    query whitening (if any) and both tokenizers (precision-independent)."""
    h = hashlib.sha256()
    for name, model in (("vlm", base.model), ("clip", clip.model)):
        for key, tensor in sorted(model.state_dict().items()):
            h.update(f"{name}.{key}:{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    whitening = query_whitening.attached(base.model)
    for name, tensor in zip(("mean", "matrix"), whitening or ()):  # part of the image query
        h.update(f"query_whitening.{name}:{tuple(tensor.shape)}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    h.update((base.path / "tokenizer.json").read_bytes())
    h.update(clip.tokenizer_bytes())
    return h.hexdigest()
