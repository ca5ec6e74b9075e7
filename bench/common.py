"""Helpers shared by the benches in bench/ (not a product module).

Work files go under cache/bench/, reports under reports/bench/. Bases are made once with
`ensure_base` (random-init preset + exported bundle, same as bench/engine.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "cache" / "bench"
OUT = ROOT / "reports" / "bench"
ANSWERS = ["yes", "no", "three"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ensure_base(preset: str, work: Path = WORK, precision: str = "fp32") -> tuple[Path, Path]:
    """(base_dir, bundle_dir) of a random-init preset, initialised and exported once (torch). Random
    weights give near-flat logits, so int8/int4 parity is not enforced (speed and memory only)."""
    base = work / preset / "base"
    bundle = work / preset / ("bundle" if precision == "fp32" else f"bundle-{precision}")
    if not (bundle / "base.json").exists():
        from kaizen.export.base_export import export_bundle
        from kaizen.trainer.bases import init_base

        if not (base / "config.json").exists():
            init_base(preset, base, seed=0)
        check = precision in ("fp32", "fp16")  # int4 `small`: argmax agreement 44 % on near-flat logits
        if not check:
            print(f"{preset}: random weights, {precision} parity not enforced (speed and memory only)", file=sys.stderr)
        export_bundle(base, bundle, precision=precision, log=lambda *_: None, check=check)
    return base, bundle


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if len(xs) else float("nan")


def median(xs) -> float:
    return pct(xs, 50)


def load() -> dict:
    """Machine load right now (1/5/15 min load average, CPU count)."""
    la = os.getloadavg()
    return {"loadavg_1m": round(la[0], 2), "loadavg_5m": round(la[1], 2), "loadavg_15m": round(la[2], 2),
            "cpus": os.cpu_count(), "at": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_report(name: str, data: dict, out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def bundle_lora_shapes(bundle_dir: Path) -> tuple[dict, dict]:
    meta = json.loads((Path(bundle_dir) / "base.json").read_text())
    return meta, {k: tuple(v) for k, v in meta["lora"]["shapes"].items()}


def pack_arrays(meta: dict, shapes: dict, rng: np.random.Generator, *, prompt_tokens: int = 10, rank: int = 8,
                n_instructions: int = 1, key: np.ndarray | None = None) -> dict:
    """prompt [P, d_model], key [d_clip] (unit), text_emb [n, d_clip], rank-`rank` LoRA on every
    LoRA input of the bundle (A [r, in], B [out, r])."""
    d_model = meta["text"]["hidden_size"]
    d_clip = meta["clip"]["dim"] if "clip" in meta else meta["query"]["text_dim"]   # CLIP, or unaligned encoders
    if key is None:
        key = rng.standard_normal(d_clip).astype(np.float32)
    key = (key / np.linalg.norm(key)).astype(np.float32)
    lora = {}
    for name, shape in shapes.items():
        shp = (rank, shape[1]) if name.endswith(".A") else (shape[0], rank)
        lora[name] = (rng.standard_normal(shp) * 0.3).astype(np.float32)
    text = rng.standard_normal((n_instructions, d_clip)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return {"prompt": (rng.standard_normal((prompt_tokens, d_model)) * 0.5).astype(np.float32), "key": key,
            "text_emb": text, "lora": lora}


def build_bundle_pack(path: Path, meta: dict, shapes: dict, signer, task_id: str, version: int, *, seed: int,
                      instruction: str = "Is the part damaged?", engine=None, image=None, golden: int = 0,
                      rank: int = 8, prompt_tokens: int = 10):
    """A signed .kpk shaped for the bundle. With `engine` and `image`, the key points at
    (image, instruction) and `golden` golden samples hold what the pack answers (so the probe passes)."""
    from kaizen.runtime.pack import build_pack
    from kaizen.runtime.pack_arrays import GoldenSample
    from kaizen.runtime.testpacks import tiny_png

    rng = np.random.default_rng(seed)
    key = None
    text_emb = None
    dims = {}
    if engine is not None and image is not None:
        text_emb = engine.text_query([instruction])
        if engine.aligned:   # one shared key in the CLIP space
            key = engine.clip_image([image])[0] + text_emb[0]
        else:                # schema 2: [image key ; text key], each a unit vector
            key = np.concatenate([engine.image_queries([image])[0][0], text_emb[0]])
            dims = {"query_dims": list(engine.query_dims)}
    arrays = pack_arrays(meta, shapes, rng, prompt_tokens=prompt_tokens, rank=rank, key=key)
    if dims:
        arrays["key"] = key.astype(np.float32)   # halves already unit
    if text_emb is not None:
        arrays["text_emb"] = text_emb.astype(np.float32)
    samples = []
    if golden and engine is not None:
        pngs = [tiny_png(seed * 40 + i) for i in range(golden)]
        got = engine.score_answers(pngs, [instruction] * golden, ANSWERS, arrays["prompt"], arrays["lora"])
        samples = [GoldenSample(p, instruction, g.answer) for p, g in zip(pngs, got)]
    return build_pack(path, task_id=task_id, version=version, method="kaizen",
                      base_fingerprint=meta["fingerprint"], instructions=[instruction], answers=ANSWERS,
                      golden=samples, metrics={"accuracy": 100.0}, signing_key=signer, lora_rank=rank,
                      **dims, **arrays)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
