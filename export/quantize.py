"""Precision options of a base bundle, applied to the exported ONNX graphs.

- int8: weight-only int8 for decoder.onnx (per-output-channel symmetric scales). Every MatMul
  whose weight is a 2-D float initializer gets `DequantizeLinear(int8, scale) -> MatMul`:
  weights are stored in int8 (about 4x smaller), compute stays fp32. Tolerance in parity.py.
- int4: weight-only 4-bit for decoder.onnx with ONNX Runtime's own tool (MatMulNBitsQuantizer):
  every MatMul whose weight is a 2-D float initializer (not a graph input, not shared by another
  node) becomes com.microsoft MatMulNBits (blockwise scales along K, block INT4_BLOCK). LoRA
  MatMuls take their A/B from graph inputs (through a Transpose) and stay fp32; so do activations.
- Both also quantize the encoder towers (vision.onnx and the query towers: clip_image.onnx +
  clip_text.onnx, or text_query.onnx) with ONNX Runtime's dynamic int8 (MatMulInteger, int8
  weights per output channel, activations quantized per call): the vision tower was the largest
  fp32 graph left in an int4 bundle (46 of 114 MB on `small`) and on CPUs with int8 dot products
  (VNNI) it runs about 1.9x faster (DINOv2-S: 22 -> 12 ms; the CLIP image query of `small`
  12 -> 6 ms). Accuracy on a trained run: README "Lower precisions"; parity.py bounds the
  logits and the query vectors against torch.
- fp16 (for GPUs) is not a rewrite: export/base_export.py exports the graphs from a float16 copy
  of the models, and the parity check compares them with the fp32 torch model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kaizen.runtime.errors import BundleError

from .onnx_io import save_onnx  # external data past the protobuf limit, like the exported graphs


def quantize_weights_int8(path: Path, min_elements: int = 1024) -> dict:
    """Rewrite MatMul float weights of `path` to int8 + per-column scale; return counts and bytes."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    nodes, replaced, saved = [], 0, 0
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT or np.prod(w.dims) < min_elements:
            nodes.append(node)
            continue
        arr = numpy_helper.to_array(w)
        scale = np.maximum(np.abs(arr).max(axis=0), 1e-8) / 127.0
        q = np.clip(np.round(arr / scale), -127, 127).astype(np.int8)
        base = w.name
        model.graph.initializer.remove(w)
        model.graph.initializer.extend([numpy_helper.from_array(q, base + "_q8"),
                                        numpy_helper.from_array(scale.astype(np.float32), base + "_scale"),
                                        numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zp")])
        nodes.append(helper.make_node("DequantizeLinear", [base + "_q8", base + "_scale", base + "_zp"],
                                      [base + "_dq"], axis=1, name=base + "_dequant"))
        node.input[1] = base + "_dq"
        nodes.append(node)
        replaced += 1
        saved += arr.nbytes - q.nbytes - scale.nbytes * 2
        del inits[base]
    if not replaced:
        raise BundleError(f"{path}: no MatMul weight found to quantize")
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    save_onnx(model, path)
    return {"matmuls_quantized": replaced, "bytes_saved": int(saved)}


# Chosen by measurement on the tiny and real-fast bases (see export/parity.py and
# reports/bench/precision_int4.md): block 32, asymmetric (uint4 + zero point), fp32 compute.
INT4_BLOCK = 32
INT4_SYMMETRIC = False


def int4_candidates(model: onnx.ModelProto, min_elements: int = 1024) -> tuple[list[str], list[str]]:
    """(names of MatMul nodes to quantize, names to keep fp32). Quantized: a 2-D float initializer
    weight with >= min_elements that is not also a graph input (an optional input such as a LoRA
    array with a zero default must stay feedable) and is read by no other node."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    take, keep = [], []
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        w = inits.get(node.input[1]) if len(node.input) == 2 else None
        ok = (w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT
              and w.name not in inputs and readers[w.name] == 1 and int(np.prod(w.dims)) >= min_elements)
        (take if ok else keep).append(node.name)
    return take, keep


def _nbits_quantizer():
    """ORT's MatMulNBitsQuantizer class. Its module calls logging.basicConfig(level=INFO) on import
    and logs every node: undo the root logger change, keep its own logger to warnings."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer


def quantize_weights_int4(path: Path, block_size: int = INT4_BLOCK, symmetric: bool = INT4_SYMMETRIC,
                          accuracy_level: int | None = None) -> dict:
    """Rewrite `path`'s MatMul weights to MatMulNBits (4 bits) in place; return counts and bytes."""
    MatMulNBitsQuantizer = _nbits_quantizer()
    model = onnx.load(str(path))
    for i, node in enumerate(model.graph.node):  # exclusion works by node name
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    take, keep = int4_candidates(model)
    if not take:
        raise BundleError(f"{path}: no MatMul with a 2-D float initializer weight to quantize to int4")
    before = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    quant = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=keep)
    quant.process()
    model = quant.model.model
    done = sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")
    if done != len(take):
        raise BundleError(f"{path}: MatMulNBitsQuantizer rewrote {done} MatMuls, expected {len(take)}; "
                          "check the onnxruntime version (1.32 tested)")
    save_onnx(model, path)
    after = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    return {"matmuls_quantized": done, "matmuls_kept_fp32": len(keep), "block_size": block_size,
            "symmetric": symmetric, "fp32_weight_bytes_removed": int(before - after)}


TOWERS = ("vision.onnx", "clip_image.onnx", "clip_text.onnx", "text_query.onnx")


def quantize_dynamic_int8(path: Path) -> dict:
    """Rewrite `path`'s MatMuls to ONNX Runtime's dynamic int8 (MatMulInteger) in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "consider pre-processing" advice on every call
    tmp = path.with_name(path.name + ".int8.tmp")
    try:
        quantize_dynamic(path, tmp, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)
        model = onnx.load(str(tmp))
    finally:
        quiet.setLevel(level)
        tmp.unlink(missing_ok=True)
    done = sum(1 for n in model.graph.node if n.op_type == "MatMulInteger")
    save_onnx(model, path)
    return {"matmuls_quantized": done}


def convert_precision(bundle_dir: Path, precision: str) -> dict:
    """Rewrite an exported fp32 bundle's graphs for `precision` (int8 or int4); return what changed."""
    bundle_dir = Path(bundle_dir)
    if precision == "int8":
        decoder = quantize_weights_int8(bundle_dir / "decoder.onnx")
    elif precision == "int4":
        decoder = quantize_weights_int4(bundle_dir / "decoder.onnx")
    else:
        raise BundleError(f"precision {precision!r} is applied at export time, not as a graph rewrite")
    towers = {name: quantize_dynamic_int8(bundle_dir / name) for name in TOWERS if (bundle_dir / name).exists()}
    return {"decoder.onnx": decoder, **towers}
