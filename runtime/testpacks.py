"""Small, valid, signed task packs from a seed, for tests, benches and demos (numpy only).

    sk = generate_signing_key()
    write_test_pack(tmp / "pick-2.kpk", "pick", 2, sk, base_fingerprint="fp")            # random arrays
    write_test_pack(tmp / "pick-3.kpk", "pick", 3, sk, base_fingerprint="fp", marker=3.0)

With `marker`, prompt, text_emb and every LoRA array are filled with that value and the key is
the unit vector e[int(marker) % d_clip], so a reader can tell which version it holds from any array.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .manifest import Manifest
from .pack import build_pack
from .pack_arrays import GoldenSample


def make_arrays(seed: int = 0, *, d_model: int = 8, d_clip: int = 6, prompt_tokens: int = 3,
                n_instructions: int = 2, rank: int = 2, layers: int = 1, targets=("q_proj", "v_proj"),
                marker: float | None = None) -> dict[str, Any]:
    """prompt, key, text_emb, lora, instructions for a tiny pack (deterministic from seed/marker)."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> np.ndarray:
        if marker is not None:
            return np.full(shape, marker, np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    if marker is not None:
        key = np.zeros(d_clip, np.float32)
        key[int(marker) % d_clip] = 1.0
    else:
        key = rng.standard_normal(d_clip).astype(np.float32)
        key /= np.linalg.norm(key)
    lora = {}
    for layer in range(layers):
        for target in targets:
            lora[f"lora.{layer}.{target}.A"] = arr(rank, d_model)
            lora[f"lora.{layer}.{target}.B"] = arr(d_model, rank)
    return {"prompt": arr(prompt_tokens, d_model), "key": key, "text_emb": arr(n_instructions, d_clip),
            "lora": lora, "instructions": [f"instruction {i} of the test task?" for i in range(n_instructions)]}


def tiny_png(value: int = 0, size: int = 4) -> bytes:
    """A valid grey PNG of size x size pixels (no pillow needed)."""
    raw = b"".join(b"\0" + bytes([value % 256]) * size for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_test_pack(path: str | os.PathLike, task_id: str, version: int, signing_key: Ed25519PrivateKey,
                    *, base_fingerprint: str = "test-base", seed: int = 0, marker: float | None = None,
                    answers: list[str] | None = ("yes", "no"), golden: int = 1, array_kwargs=None,
                    **build_kwargs) -> Manifest:
    """Build a small signed pack at `path`; build_kwargs override build_pack's arguments."""
    arrays = make_arrays(seed, marker=marker, **(array_kwargs or {}))
    samples = [GoldenSample(tiny_png(i), arrays["instructions"][0], "yes") for i in range(golden)]
    kwargs = dict(task_id=task_id, version=version, method="kaizen", base_fingerprint=base_fingerprint,
                  answers=None if answers is None else list(answers), golden=samples,
                  metrics={"accuracy": 0.9}, signing_key=signing_key, **arrays)
    kwargs.update(build_kwargs)
    return build_pack(path, **kwargs)
