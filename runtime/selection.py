"""Dual-modality task selection (ModalPrompt): numpy top-k over the installed task keys.

    score[t] = alpha * cos(q_img, key_img[t]) + (1 - alpha) * cos(q_txt, key_txt[t])

Two kinds of query encoders (base.json "query"): an aligned CLIP (image and text queries live in
one space: ONE key per task, key_img = key_txt = key, [T, d]) or unaligned encoders (the base's
own vision tower for the image query, a sentence encoder for the text: one key per modality,
stored side by side as keys [T, d_img + d_txt]). `split_keys` tells them apart by width: a key
as wide as both queries is shared; one as wide as their sum is two keys.

The trainer's torch twin (trainer/methods/modalprompt.py) must give the same scores and order;
tests/test_selection_parity.py binds them. Ties go to the lower index (stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHA = 0.5


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray  # [B, k] best first
    scores: np.ndarray  # [B, T] all scores
    matched: np.ndarray  # [B] bool: best score >= threshold


def normalise(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def split_keys(keys: np.ndarray, d_img: int, d_txt: int) -> tuple[np.ndarray, np.ndarray]:
    """[T, d] shared keys or [T, d_img + d_txt] per-modality keys -> (key_img, key_txt)."""
    width = keys.shape[-1]
    if width == d_img == d_txt:
        return keys, keys
    if width == d_img + d_txt:
        return keys[..., :d_img], keys[..., d_img:]
    raise ValueError(f"task keys have width {width}; the queries have {d_img} (image) and {d_txt} (text) "
                     "values: the packs were trained for another base's query encoders")


def scores(q_img: np.ndarray, q_txt: np.ndarray, keys: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """[B, d_img] image queries, [B, d_txt] text queries, keys [T, d] or [T, d_img + d_txt] -> [B, T]."""
    k_img, k_txt = split_keys(np.asarray(keys, np.float32), q_img.shape[-1], q_txt.shape[-1])
    return alpha * (normalise(q_img) @ normalise(k_img).T) + (1.0 - alpha) * (normalise(q_txt) @ normalise(k_txt).T)


def top_k(score: np.ndarray, k: int) -> np.ndarray:
    k = min(k, score.shape[1])
    return np.argsort(-score, axis=1, kind="stable")[:, :k]


def select(q_img, q_txt, keys, k: int = 3, threshold: float = -1.0, alpha: float = ALPHA) -> Selection:
    if len(keys) == 0:
        b = len(q_img)
        return Selection(np.zeros((b, 0), np.int64), np.zeros((b, 0), np.float32), np.zeros(b, bool))
    s = scores(q_img, q_txt, np.asarray(keys), alpha)
    idx = top_k(s, k)
    best = np.take_along_axis(s, idx[:, :1], axis=1)[:, 0]
    return Selection(idx, s, best >= threshold)
