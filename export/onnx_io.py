"""Small ONNX helpers for the exporter: torch.onnx.export with our conventions, optional inputs with
zero defaults, saving with external data past the protobuf limit, listing a graph's data files.

    export_graph(module, args, out / "decoder.onnx", names_in, names_out, dyn, zero_defaults=shapes)
    save_onnx(model_proto, out / "decoder.onnx")        # a rewritten graph (int8), same size rule
    external_data_files(out / "decoder.onnx")           # ["decoder.onnx.data"] or []

Size rule: a graph whose initializers exceed `threshold` bytes (default: the 2 GiB protobuf limit
minus a 64 MiB margin for the graph itself) is written as `<name>.onnx` + `<name>.onnx.data` next to
it (one file, weights packed densely, written tensor by tensor); smaller graphs stay one
self-contained file. Tests force external data on a tiny base with `threshold=0`.

Why torch.onnx.export and not optimum-onnx: optimum pins transformers < 4.58 (it would silently
downgrade transformers) and has no LLaVA export taking `inputs_embeds`, which the soft prompts need.
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from kaizen.runtime.errors import BundleError

OPSET = 18
PROTOBUF_LIMIT = 2**31  # bytes: protobuf cannot serialise a message of 2 GiB or more
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20  # initializer bytes above which weights go external
INLINE_TENSOR_BYTES = 1024  # tensors this small stay inside the .onnx even when the rest is external


def data_file_name(path: Path) -> str:
    """The external data file of graph `path`: next to it, `<file name>.data`."""
    return Path(path).name + ".data"


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_ir(model: ir.Model, path: Path, threshold: int | None = None) -> list[str]:
    """Write `model` to `path`, with external data when its initializers exceed `threshold`;
    return the external data file names written (relative to path's folder)."""
    path = Path(path)
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    data = path.parent / data_file_name(path)
    if initializer_bytes(model) > threshold:
        # onnx_ir streams tensor by tensor into a temporary file and renames it over `data`.
        ir.save(model, path, external_data=data.name, size_threshold_bytes=INLINE_TENSOR_BYTES)
        return [data.name]
    ir.save(model, path)
    data.unlink(missing_ok=True)  # a stale data file from an earlier, larger export of this graph
    return []


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int | None = None) -> list[str]:
    """`save_ir` for a ModelProto (e.g. a graph rewritten by export/quantize.py); no weight copy."""
    return save_ir(ir.from_proto(model), path, threshold)


def _add_zero_defaults(model: ir.Model, shapes: dict[str, tuple[int, ...]], dtype) -> None:
    """Give graph inputs `shapes` a zero initializer (same value): they become optional inputs.
    Float inputs get `dtype`; an integer input (decoder.onnx's logits_to_keep) its own type."""
    inputs = {v.name: v for v in model.graph.inputs}
    missing = sorted(set(shapes) - set(inputs))
    if missing:
        raise BundleError(f"exported graph lacks LoRA inputs {missing[:3]}: the decoder wrapper and "
                          "add_lora_slots disagree on the target names")
    for name, shape in shapes.items():
        value = inputs[name]
        own = value.dtype.numpy() if value.dtype is not None and value.dtype.is_integer() else dtype
        value.const_value = ir.Tensor(np.zeros(shape, own), name=name)
        model.graph.register_initializer(value)


def export_graph(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes,
                 zero_defaults: dict[str, tuple[int, ...]] | None = None, zero_dtype=np.float32,
                 threshold: int | None = None) -> list[str]:
    """Export `module(*args)` with the dynamo exporter to `path` (+ `<name>.data` when over `threshold`).

    `zero_defaults` {input name: shape}: those inputs get a zero initializer (optional inputs), added
    to the in-memory graph so the weights are written once and never read back. Returns the
    external data file names written.
    """
    module.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                 output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                 verbose=False, report=False)
    try:
        if zero_defaults:
            _add_zero_defaults(prog.model, zero_defaults, zero_dtype)
        # The IR's initializers are views of the module's parameters: saving streams them, no copy.
        return save_ir(prog.model, Path(path), threshold)
    finally:
        del prog
        gc.collect()


def external_data_files(path: Path) -> list[str]:
    """The external data files graph `path` references (read without loading the weights), in order."""
    model = onnx.load(str(path), load_external_data=False)
    names: list[str] = []
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc is None:
                raise BundleError(f"{path}: tensor {t.name!r} is external but names no location")
            if loc not in names:
                names.append(loc)
    return names
