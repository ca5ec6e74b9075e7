"""Precision options of a base bundle, applied to the exported ONNX graphs.

- int8: weight-only int8 for decoder.onnx (per-output-channel symmetric scales). Every MatMul
  whose weight is a 2-D float initializer gets `DequantizeLinear(int8, scale) -> MatMul`:
  weights are stored in int8 (about 4x smaller), compute stays fp32. Tolerance in parity.py.
- fp16 (for GPUs) is not a rewrite: export/base_export.py exports the graphs from a float16 copy
  of the models, and the parity check compares them with the fp32 torch model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kaizen.runtime.errors import BundleError


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
    onnx.save(model, str(path))
    return {"matmuls_quantized": replaced, "bytes_saved": int(saved)}


def convert_precision(bundle_dir: Path, precision: str) -> dict:
    bundle_dir = Path(bundle_dir)
    if precision == "int8":
        return quantize_weights_int8(bundle_dir / "decoder.onnx")
    raise BundleError(f"precision {precision!r} is applied at export time, not as a graph rewrite")
