"""Sentence encoder (a sentence-transformers folder, e.g. all-MiniLM-L6-v2) -> text_encoder.onnx.

    enc, tok, max_len = load_sentence_encoder(folder)        # local files only, no sentence-transformers
    export_text_encoder(enc, Path("bundle/text_encoder.onnx"))
    check_text_encoder(enc, tok, Path("bundle/text_encoder.onnx"), PARITY_TEXTS)   # raises on > 1e-4

The folder layout is read by hand: modules.json lists Transformer -> Pooling (-> Normalize);
1_Pooling/config.json picks mean or cls pooling; sentence_bert_config.json gives max_seq_length.
Graph: input_ids i64[B,T], attention_mask i64[B,T] -> text_embeds f32[B,d] (pooled, normalised),
token_type_ids are zeros inside the graph. The station side is kaizen.runtime.text_query.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import BertConfig, BertModel

from kaizen.runtime.errors import BundleError
from kaizen.runtime.text_query import INPUTS, OUTPUT, check_texts, configure_tokenizer, tokenize

PARITY_TOL = 1e-4
PARITY_TEXTS = ["Is the seal torn?", "How many screws are missing from the bracket on the left side?",
                "cable colour", "Is the label upside down or rotated by ninety degrees?",
                "Which part type is this?", "Count the holes."]
ST = "sentence_transformers.models."
REQUIRED_FILES = ("modules.json", "config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class SentenceLayout:
    """What a sentence-transformers folder says about pooling, normalisation and length."""

    pooling: str  # "mean" | "cls"
    normalize: bool
    max_len: int
    dim: int


def _read_json(path: Path) -> dict | list:
    if not path.is_file():
        raise BundleError(f"{path} is missing: {path.parent} is not a sentence-transformers folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{path} is not valid JSON ({err})") from err


def read_layout(folder: Path) -> SentenceLayout:
    """Validate a sentence-transformers folder (Transformer, Pooling, optional Normalize)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"sentence encoder folder {folder} does not exist")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise BundleError(f"{folder / name} is missing: {folder} is not a sentence-transformers folder "
                              f"(needs {', '.join(REQUIRED_FILES)}, 1_Pooling/config.json)")
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise BundleError(f"{folder / 'modules.json'} must be a list of {{'type', 'path'}} entries")
    types = [m["type"].removeprefix(ST) for m in modules]
    if types[:2] != ["Transformer", "Pooling"] or any(t != "Normalize" for t in types[2:]):
        raise BundleError(f"{folder / 'modules.json'} lists {types}; supported: Transformer, Pooling, "
                          "optionally Normalize (a Dense layer or other module is not)")
    pool_cfg = _read_json(folder / modules[1].get("path", "1_Pooling") / "config.json")
    modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens")
             for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v is True]
    if modes not in (["mean"], ["cls"]):
        raise BundleError(f"{folder / modules[1].get('path', '1_Pooling') / 'config.json'} enables pooling "
                          f"{modes}; exactly one of mean, cls is supported")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "bert":
        raise BundleError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}; "
                          "only BERT-architecture sentence encoders are supported")
    st_cfg = folder / "sentence_bert_config.json"
    max_len = int(_read_json(st_cfg).get("max_seq_length", 0)) if st_cfg.is_file() else 0
    max_len = min(max_len or config["max_position_embeddings"], config["max_position_embeddings"])
    return SentenceLayout(pooling=modes[0], normalize=len(types) > 2, max_len=max_len,
                          dim=int(config["hidden_size"]))


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) -> pooled (and L2-normalised) sentence embedding [B, d]."""

    def __init__(self, bert: BertModel, layout: SentenceLayout, tokenizer: Tokenizer | None = None):
        super().__init__()
        self.bert = bert
        self.layout = layout
        self.tokenizer = tokenizer  # configured by load_sentence_encoder; used by encode()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        if self.layout.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # mean over real tokens, as sentence-transformers' Pooling (clamp 1e-9)
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if self.layout.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """float32 [n, d] for at most kaizen.runtime.text_query.MAX_TEXTS texts, same ids as the runtime."""
        if self.tokenizer is None:
            raise BundleError("this SentenceEncoder has no tokenizer; build it with load_sentence_encoder()")
        ids, mask = tokenize(self.tokenizer, check_texts(texts))
        return self.eval()(torch.from_numpy(ids), torch.from_numpy(mask))


def load_sentence_encoder(folder: str | Path) -> tuple[SentenceEncoder, Tokenizer, int]:
    """(encoder in eval mode, tokenizer configured for max_len, max_len) from a local folder."""
    folder = Path(folder)
    layout = read_layout(folder)
    try:
        config = BertConfig.from_pretrained(folder, local_files_only=True)
        bert, info = BertModel.from_pretrained(folder, config=config, local_files_only=True,
                                               attn_implementation="eager", output_loading_info=True)
    except (OSError, ValueError) as err:
        raise BundleError(f"cannot load the BERT weights of {folder} ({err})") from err
    if info["missing_keys"] or info["mismatched_keys"]:  # random init would pass parity and be useless
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise BundleError(f"{folder / 'model.safetensors'} lacks or mis-shapes weights {bad[:4]}; "
                          "reinstall the model package")
    if config.hidden_size != layout.dim:
        raise BundleError(f"{folder}: hidden_size {config.hidden_size} != pooling dim {layout.dim}")
    try:
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise BundleError(f"{folder / 'tokenizer.json'} is not a valid tokenizer.json ({err})") from err
    configure_tokenizer(tok, layout.max_len)
    enc = SentenceEncoder(bert.eval(), layout, tok).eval()
    return enc, tok, layout.max_len


def export_text_encoder(encoder: SentenceEncoder, out_path: Path, opset: int = 18) -> None:
    """Write a self-contained text_encoder.onnx with dynamic batch and sequence length."""
    encoder.eval()
    ids = torch.tensor([[101, 2003, 1996, 7367, 2140, 102, 0, 0], [101, 2129, 2116, 102, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=encoder.layout.max_len)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Same conventions as export/onnx_io.export_graph, which pins OPSET; here the opset is a parameter.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(encoder, (ids, mask), dynamo=True, opset_version=opset,
                                 input_names=list(INPUTS), output_names=[OUTPUT], dynamic_shapes=shapes,
                                 verbose=False, report=False)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    prog.save(str(out_path), external_data=False)


def check_text_encoder(encoder: SentenceEncoder, tokenizer: Tokenizer, onnx_path: Path,
                       texts: list[str] = PARITY_TEXTS) -> float:
    """max |ORT - torch| over `texts` as one right-padded batch and one by one; BundleError above 1e-4."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for group in [texts, *([t] for t in texts)]:
        ids, mask = tokenize(tokenizer, check_texts(group))
        with torch.no_grad():
            ref = encoder.eval()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        out = sess.run([OUTPUT], {"input_ids": ids, "attention_mask": mask})[0]
        worst = max(worst, float(np.abs(out - ref).max()))
    if worst > PARITY_TOL:
        raise BundleError(f"text encoder {onnx_path} differs from torch by {worst:.2e} (> {PARITY_TOL:g}); "
                          "the export is broken, do not ship it")
    return worst
