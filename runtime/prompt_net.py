"""Image-conditioned prompts: a pack's small meta-net shifts its prompt by what the image shows.

After CoCoOp (conditional prompt learning, Zhou et al. 2022): a pack may carry `prompt_net.npz`
with two matrices, W1 [h, d_img] and W2 [prompt_tokens * d_model, h]. For a part whose unit image
query is q (the same vector selection uses: the CLIP image embedding, or the base's own pooled
vision output for unaligned query encoders), the pack's prompt becomes

    prompt(q) = prompt + reshape(relu(W1 q) W2^T, [prompt_tokens, d_model])

so each part gets its own prompt rows. Why: on the real-fast base the frozen projector and the
64-wide language model lose what the DINOv2 CLS row knows (a linear probe on it reads cable
colours at 95 %); the meta-net hands the task's view of it to the language model directly
(README "Image-conditioned prompts" has the measurements). The trainer's twin is
kaizen.trainer.methods.modalprompt.PromptNet; tests/test_prompt_net.py checks they agree.

    check_prompt_net(net, prompt_tokens=10, d_model=64, d_img=384)   # ValueError naming the array
    rows = conditioned(prompt, net, q_img)                            # [B, prompt_tokens, d_model]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .pack_arrays import check_array

MEMBER = "prompt_net.npz"
ARRAYS = ("W1", "W2")
MAX_HIDDEN = 1024  # a meta-net wider than this is not a small pack any more


def check_prompt_net(net: Mapping[str, np.ndarray], prompt_tokens: int, d_model: int, d_img: int) -> None:
    """W1 [h, d_img] and W2 [prompt_tokens * d_model, h], finite float32 arrays, 1 <= h <= MAX_HIDDEN;
    ValueError naming the array and what it should be."""
    names = sorted(net)
    if names != sorted(ARRAYS):
        raise ValueError(f"{MEMBER}: must hold exactly the arrays {list(ARRAYS)}, has {names}")
    for name in ARRAYS:
        check_array(f"{MEMBER}[{name}]", net[name], 2)  # float32, 2-D, finite
    w1, w2 = net["W1"], net["W2"]
    hidden = w1.shape[0]
    if not 1 <= hidden <= MAX_HIDDEN:
        raise ValueError(f"{MEMBER}[W1]: hidden width {hidden} must be in 1..{MAX_HIDDEN}")
    if w1.shape[1] != d_img:
        raise ValueError(f"{MEMBER}[W1]: shape {list(w1.shape)}, axis 1 should be the image query width {d_img}")
    want = [prompt_tokens * d_model, hidden]
    if list(w2.shape) != want:
        raise ValueError(f"{MEMBER}[W2]: shape {list(w2.shape)}, expected {want} "
                         f"(prompt_tokens {prompt_tokens} x d_model {d_model}, W1's hidden width)")


def conditioned(prompt: np.ndarray, net: Mapping[str, np.ndarray] | None, q_img: np.ndarray) -> np.ndarray:
    """Per-part prompts [B, R, d] from a pack's prompt [R, d], its net (None: the prompt itself for
    every part) and unit image queries [B, d_img]."""
    q = np.asarray(q_img, dtype=np.float32)
    assert q.ndim == 2, "image queries must be [B, d_img]"
    base = np.broadcast_to(np.asarray(prompt, np.float32), (len(q), *prompt.shape))
    if net is None:
        return np.array(base)
    shift = np.maximum(q @ net["W1"].T, 0.0) @ net["W2"].T
    return base + shift.reshape(len(q), *prompt.shape).astype(np.float32)
