"""Dual-modality task selection (ModalPrompt): numpy top-k over the installed task keys.

    score[t] = alpha * cos(q_img, key[t]) + (1 - alpha) * cos(q_txt, key[t])

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


def scores(q_img: np.ndarray, q_txt: np.ndarray, keys: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """[B, d] image queries, [B, d] text queries, [T, d] keys -> [B, T] scores (inputs normalised here)."""
    k = normalise(keys)
    return alpha * (normalise(q_img) @ k.T) + (1.0 - alpha) * (normalise(q_txt) @ k.T)


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
