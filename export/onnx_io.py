"""Small ONNX helpers for the exporter: torch.onnx.export with our conventions, optional
inputs with zero defaults, file hashing.

Why torch.onnx.export and not optimum-onnx: optimum pins transformers < 4.58 (it would silently
downgrade transformers) and has no LLaVA export taking `inputs_embeds`, which the soft prompts need.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

OPSET = 18


def export_graph(module, args: tuple, path: Path, input_names, output_names, dynamic_shapes) -> None:
    """Export `module(*args)` with the dynamo exporter into a single self-contained .onnx file."""
    module.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET, input_names=list(input_names),
                                 output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                                 verbose=False, report=False)
    prog.save(str(path), external_data=False)


def add_zero_defaults(path: Path, shapes: dict[str, tuple[int, ...]], dtype=np.float32) -> None:
    """Give graph inputs `shapes` a zero initializer of the same name: they become optional inputs."""
    model = onnx.load(str(path))
    inputs = {i.name for i in model.graph.input}
    missing = set(shapes) - inputs
    assert not missing, f"exported graph lacks inputs {sorted(missing)[:3]}"
    for name, shape in shapes.items():
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), name))
    onnx.save(model, str(path))


