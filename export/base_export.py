"""Export a frozen base (LLaVA + CLIP query encoder) to an ONNX base bundle, once per base.

    kaizen base export bases/tiny-llama --out bundles/tiny-llama [--precision fp32|fp16|int8|int4]
        [--lora-targets q_proj,k_proj,v_proj,o_proj]   # default: the base's own LoRA targets

Writes vision.onnx, embed.npy, decoder.onnx (KV cache + every LoRA A/B as an optional input with
a zero default), clip_image.onnx, clip_text.onnx, tokenizers, preprocess.json and base.json (sha256
of every file + the base fingerprint), then runs the parity check against torch and fails loudly.
A graph whose weights pass the protobuf limit (2 GiB) is written with its weights in
`<graph>.onnx.data` next to it; base.json lists and hashes that file too (export/onnx_io.py).
Peak memory: the fp32 decoder is exported from the loaded model itself (LoRA slots added, then
removed), so the weights are held once; `bench/export_memory.py` measures it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kaizen.runtime.bundle import BUNDLE_SCHEMA_VERSION, bundle_files
from kaizen.runtime.durable import sha256_file
from kaizen.runtime.errors import BundleError

from .loading import Base, Clip, TextQuery, base_fingerprint, load_base, load_query
from .lora_targets import base_lora_targets, parse_targets
from .onnx_io import export_graph, external_data_files
from .wrappers import (
    ATTN_TARGETS,
    ClipImageWrapper,
    ClipTextWrapper,
    DecoderWrapper,
    VisionWrapper,
    add_lora_slots,
)

PRECISIONS = ("fp32", "fp16", "int8", "int4")


def _dims():
    D = torch.export.Dim
    return D("batch", max=256), D("seq", max=4096), D("past", max=4096)


def _as(model, dtype):
    """The model itself in fp32; a converted copy otherwise (the fp32 original serves the parity check)."""
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def export_vision(base: Base, out: Path, dtype=torch.float32, with_query: bool = False,
                  threshold: int | None = None) -> None:
    """vision.onnx; `with_query` adds the pooled output `image_query` (unaligned query encoders)."""
    batch, _, _ = _dims()
    size = base.preprocess.size
    names = ["image_features", "image_query"] if with_query else ["image_features"]
    export_graph(VisionWrapper(_as(base.model, dtype), with_query), (torch.randn(2, 3, size, size, dtype=dtype),),
                 out / "vision.onnx", ["pixel_values"], names, {"pixel_values": {0: batch}}, threshold=threshold)


@contextlib.contextmanager
def _with_lora_slots(base: Base, rank: int, targets, dtype):
    """The model to export the decoder from, with LoRA slots: fp32 is the loaded model itself (the
    slots wrap its Linears and are removed afterwards, so the weights are never copied); another
    dtype is a converted copy."""
    model = _as(base.model, dtype)
    lm = model.model.language_model
    shapes = add_lora_slots(lm, targets, rank)
    try:
        yield model, shapes
    finally:
        if model is base.model:
            for layer in lm.layers:
                for t in targets:
                    parent = layer.self_attn if t in ATTN_TARGETS else layer.mlp
                    setattr(parent, t, getattr(parent, t).base)


def export_decoder(base: Base, out: Path, rank: int, targets, dtype=torch.float32,
                   threshold: int | None = None) -> dict:
    """Export the language model + head with KV cache and LoRA inputs; return the LoRA shapes."""
    with _with_lora_slots(base, rank, targets, dtype) as (model, shapes):
        _export_decoder(model, shapes, out, targets, dtype, threshold)
    return {k: list(v) for k, v in shapes.items()}


def _export_decoder(model, shapes: dict, out: Path, targets, dtype, threshold: int | None) -> None:
    text = model.config.text_config
    dec = DecoderWrapper(model, targets).eval()
    n_layers, kv = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    batch, seq, past = _dims()
    b, s, p = 2, 5, 3
    past_t = [torch.randn(b, kv, p, head_dim, dtype=dtype) for _ in range(2 * n_layers)]
    lora_t = [(torch.randn(*shape) * 0.01).to(dtype) for shape in shapes.values()]
    args = (torch.randn(b, s, text.hidden_size, dtype=dtype), torch.ones(b, p + s, dtype=torch.long),
            torch.arange(p, p + s).repeat(b, 1), past_t, lora_t, torch.tensor(1, dtype=torch.long))
    names_in = ["inputs_embeds", "attention_mask", "position_ids"]
    names_in += [f"past.{i}.{kv_}" for i in range(n_layers) for kv_ in ("key", "value")] + list(shapes)
    names_in += ["logits_to_keep"]  # int64 scalar, optional: default 0 = logits for every position
    names_out = ["logits"] + [f"present.{i}.{kv_}" for i in range(n_layers) for kv_ in ("key", "value")]
    dyn = {"inputs_embeds": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
           "position_ids": {0: batch, 1: seq}, "past": [{0: batch, 2: past}] * (2 * n_layers),
           "lora": [None] * len(shapes), "logits_to_keep": None}
    export_graph(dec, args, out / "decoder.onnx", names_in, names_out, dyn, zero_defaults={**shapes, "logits_to_keep": ()},
                 zero_dtype=np.float16 if dtype == torch.float16 else np.float32, threshold=threshold)


def export_clip(clip: Clip, out: Path, threshold: int | None = None) -> None:
    """The CLIP towers, always fp32 (small next to the VLM; fp16 open_clip graphs crash ORT 1.32's optimizer)."""
    batch, _, _ = _dims()
    size = clip.preprocess.size
    model = clip.model
    export_graph(ClipImageWrapper(model), (torch.randn(2, 3, size, size),), out / "clip_image.onnx",
                 ["pixel_values"], ["image_embeds"], {"pixel_values": {0: batch}}, threshold=threshold)
    ids = torch.ones(2, clip.max_len, dtype=torch.long)
    export_graph(ClipTextWrapper(model), (ids, torch.ones_like(ids)), out / "clip_text.onnx",
                 ["input_ids", "attention_mask"], ["text_embeds"],
                 {"input_ids": {0: batch}, "attention_mask": {0: batch}}, threshold=threshold)


def export_text_query(query: TextQuery, out: Path) -> None:
    """The sentence encoder (unaligned text query): text_query.onnx + text_tokenizer.json, always fp32."""
    from .text_encoder import export_text_encoder

    export_text_encoder(query.model, out / "text_query.onnx")
    (out / "text_tokenizer.json").write_bytes(query.tokenizer_bytes())


def _query_meta(base: Base, clip) -> dict:
    if clip.aligned:
        return {"query": {"kind": "clip"},
                "clip": {"dim": clip.model.config.projection_dim, "max_len": clip.max_len,
                         "bos_token_id": clip.model.config.text_config.bos_token_id,
                         "eos_token_id": clip.model.config.text_config.eos_token_id,
                         "pad_token_id": clip.model.config.text_config.pad_token_id or 0}}
    return {"query": {"kind": "vision+text", "image_dim": int(base.model.config.vision_config.hidden_size),
                      "text_dim": int(clip.dim), "text_max_len": int(clip.max_len)}}


def write_meta(base: Base, clip, out: Path, rank: int, targets, shapes: dict, precision: str) -> dict:
    text = base.model.config.text_config
    np.save(out / "embed.npy", base.model.get_input_embeddings().weight.detach().numpy().astype(np.float32))
    shutil.copy(base.path / "tokenizer.json", out / "tokenizer.json")
    pre = {"vision": base.preprocess.to_dict()}
    if clip.aligned:
        (out / "clip_tokenizer.json").write_bytes(clip.tokenizer_bytes())
        pre["clip"] = clip.preprocess.to_dict()
    (out / "preprocess.json").write_text(json.dumps(pre, indent=2))
    meta = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "fingerprint": base_fingerprint(base, clip),
        "source": {"base": str(base.path), "clip": str(clip.path), "preset": base.info.get("preset", {}).get("name")},
        "precision": precision,
        "prompt": base.spec.to_dict(),
        "text": {"hidden_size": text.hidden_size, "num_layers": text.num_hidden_layers,
                 "num_kv_heads": text.num_key_value_heads, "vocab_size": text.vocab_size,
                 "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads},
        **_query_meta(base, clip),
        "lora": {"rank": rank, "targets": list(targets), "shapes": shapes},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    names = list(bundle_files(meta["query"]["kind"]))
    external = {g: external_data_files(out / g) for g in names if g.endswith(".onnx")}
    meta["external_data"] = {g: files for g, files in external.items() if files}
    names += [f for files in meta["external_data"].values() for f in files]
    meta["files"] = {name: sha256_file(out / name) for name in names}
    (out / "base.json").write_text(json.dumps(meta, indent=2))
    return meta


def export_bundle(base_dir, out, clip_dir=None, precision: str = "fp32", rank: int = 8,
                  targets=None, check: bool = True, log=print,
                  external_data_threshold: int | None = None) -> dict:
    """Export `base_dir` (+ CLIP at `clip_dir`, default base_dir/clip) to bundle folder `out`.

    `targets`: the LM Linears that get LoRA inputs; None = the base's own (kaizen_base.json
    "lora.targets", all 7 for a base without it). base.json records them ("lora.targets").

    `external_data_threshold`: initializer bytes above which a graph's weights go to
    `<graph>.onnx.data` (default: just under the 2 GiB protobuf limit; 0 forces it, for tests)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = load_base(base_dir)
    clip = load_query(base, clip_dir)  # a CLIP, or the base's unaligned text encoder
    where = f"{base.path}/kaizen_base.json"
    targets = base_lora_targets(base.info, where) if targets is None else parse_targets(targets, "LoRA targets")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").unlink(missing_ok=True)  # a report from an earlier export into this folder
    t0 = time.perf_counter()
    dtype = torch.float16 if precision == "fp16" else torch.float32  # fp16: weights and activations
    thr = external_data_threshold
    export_vision(base, out, dtype, with_query=not clip.aligned, threshold=thr)
    shapes = export_decoder(base, out, rank, targets, dtype, threshold=thr)
    if clip.aligned:
        export_clip(clip, out, threshold=thr)
    else:
        export_text_query(clip, out)
    if precision in ("int8", "int4"):  # decoder weights + dynamic int8 towers (export/quantize.py)
        from .quantize import convert_precision

        convert_precision(out, precision)
    meta = write_meta(base, clip, out, rank, targets, shapes, precision)
    log(f"exported {base_dir} -> {out} ({precision}) in {time.perf_counter() - t0:.1f}s")
    gc.collect()  # the exporter's traced programs, before the parity check loads ORT sessions
    if check:
        from .parity import parity_report

        report = parity_report(base, clip, out, precision=precision)
        (out / "parity.json").write_text(json.dumps(report, indent=2))  # also when it failed: the figures
        if report["failures"]:
            raise BundleError(f"parity check failed for {out} (figures in {out / 'parity.json'}): "
                              + "; ".join(report["failures"]))
        log(f"parity ok: max|diff| logits {report['max_abs_diff_logits']:.2e} (last position "
            f"{report['max_rel_diff_last_logits']:.2f} x their std), argmax agreement "
            f"{report['argmax_agreement']:.3f}, greedy tokens equal: {report['tokens_equal']}")
    return meta


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen base export", description=__doc__.splitlines()[0])
    ap.add_argument("base", help="base folder (a local LlavaForConditionalGeneration checkpoint)")
    ap.add_argument("--clip", help="CLIP query encoder folder (default BASE/clip)")
    ap.add_argument("--out", required=True, help="bundle folder to write")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-targets", default=None,
                    help="comma list among q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                         "(default: the base's own, kaizen_base.json lora.targets; all 7 for older bases)")
    ap.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    a = ap.parse_args(argv)
    export_bundle(a.base, a.out, a.clip, a.precision, a.lora_rank, targets=a.lora_targets, check=not a.no_check)
    return 0
