"""Query whitening: a base-level linear map on the image query of unaligned query encoders.

A DINOv2 CLS is anisotropic: a few directions (background, brightness, line drawing vs photo)
dominate every cosine, so two tasks that share a question and differ in what the parts look like
are told apart by a small margin. `kaizen base pretrain` fits, on the SAME generic images it
aligns the projector with (never task data), the ZCA map of their unit pooled tower outputs,

    q_white = (unit(q) - mean) @ matrix,   matrix = V diag(1 / sqrt(ev + EPS * max(ev))) V^T,

stores it as BASE/query_whitening.npz (`mean` [d], `matrix` [d, d], float32), and every image
query is whitened from then on: export/reference.vision_pass applies it, so the trainer's keys,
the parity check and vision.onnx's `image_query` output (which stations normalise) all agree. A
base without the file is unchanged. Being part of the base, it enters the base fingerprint: a base
whitened after its packs were made refuses them ("wrong base").

Measured (real-fast, prototype selection, `realdev` 112 px): 94.0 % -> 95.7 % (EPS 0.01); the
built-in inspection stream stays 100 % (README "Query whitening").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kaizen.runtime.errors import BundleError

FILE = "query_whitening.npz"
EPS = 0.01  # ridge relative to the largest eigenvalue: 0.001-0.03 measured alike; 0.1 loses the gain
ATTR = "kaizen_query_whitening"  # a plain attribute of the model: not a buffer, never saved with its weights


def fit(pooled: np.ndarray, eps: float = EPS) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], matrix [d, d]) of the ZCA whitening of the unit rows of `pooled` [n, d]."""
    x = np.asarray(pooled, np.float64)
    assert x.ndim == 2 and len(x) >= 2, "whitening needs at least 2 pooled queries"
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(0)
    ev, vec = np.linalg.eigh(np.cov((x - mean).T))
    ev = np.clip(ev, 0.0, None)
    matrix = vec @ np.diag(1.0 / np.sqrt(ev + eps * ev.max())) @ vec.T
    return mean.astype(np.float32), matrix.astype(np.float32)


def save(base_dir, mean: np.ndarray, matrix: np.ndarray) -> Path:
    path = Path(base_dir) / FILE
    with open(path, "wb") as f:
        np.savez(f, mean=mean.astype(np.float32), matrix=matrix.astype(np.float32))
    return path


def load(base_dir, width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The base's whitening, checked against the pooled query width; None when the base has none."""
    path = Path(base_dir) / FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} is not a readable .npz ({err}); re-run `kaizen base pretrain`") from err
    mean, matrix = arrays.get("mean"), arrays.get("matrix")
    ok = (set(arrays) == {"mean", "matrix"} and mean.shape == (width,) and matrix.shape == (width, width)
          and mean.dtype == np.float32 and matrix.dtype == np.float32
          and np.isfinite(mean).all() and np.isfinite(matrix).all())
    if not ok:
        raise BundleError(f"{path} must hold float32 `mean` [{width}] and `matrix` [{width}, {width}] (finite), "
                          f"got {sorted((k, v.dtype.name, v.shape) for k, v in arrays.items())}; "
                          "re-run `kaizen base pretrain`")
    return mean, matrix


def attach(model, mean: np.ndarray, matrix: np.ndarray) -> None:
    """Make `model` (a LlavaForConditionalGeneration) whiten its image queries from now on."""
    object.__setattr__(model, ATTR, (torch.from_numpy(mean), torch.from_numpy(matrix)))


def attached(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    return getattr(model, ATTR, None)


def apply(model, pooled: torch.Tensor) -> torch.Tensor:
    """The image query of `model` for pooled tower outputs [B, d]: whitened when the base says so."""
    w = attached(model)
    if w is None:
        return pooled
    mean, matrix = w
    unit = pooled / pooled.norm(dim=-1, keepdim=True)
    return (unit - mean.to(pooled.dtype)) @ matrix.to(pooled.dtype)
