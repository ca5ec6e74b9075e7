"""Drifted variants of the built-in synthetic tasks: what a plant meets after a pack shipped.

Two kinds of drift, both deterministic from a seed (same seed -> byte-identical images):

    lighting   a new lighting regime: the scene rendered as before, then dimmed (gain 0.30-0.45)
               under a warm sodium-lamp colour cast (R x1.25, G x0.95, B x0.55) with the
               stronger sensor noise of a dim image. Any built-in task.
    supplier   a new supplier's part colour: seal rings in blue silicone instead of dark
               rubber (seal_defect), plates powder-coated blue instead of bare metal
               (plate_defect, hole_count).

A drifted task keeps the original task's id, answer set, phrasings and balance (the same
questions, new-looking parts), so its samples are what a station running the task's pack would
capture and an operator would label. Images are drawn from their own generators, seeded by
(seed, task, split, index, drift kind), never the original stream's: the built-in stream
(trainer/data/synthetic.py) is untouched and stays byte-identical.

    from kaizen.trainer.data.drift import drifted_task
    task = drifted_task("seal_defect", "supplier", seed=0, n_train=120, n_test=40)
    python -m kaizen.trainer.data.drift --out drift.png     # contact sheet: original vs drifted
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kaizen.runtime.errors import ConfigError

from . import render as R
from .synthetic import TASK_IDS, balanced, get_spec
from .types import Sample, Task

DRIFT_SALT = 0x0D51F7  # keeps drifted generators apart from the original stream's
KINDS = ("lighting", "supplier")
SUPPLIER_TASKS = ("seal_defect", "plate_defect", "hole_count")
_SPLIT_CODE = {"train": 11, "test": 12}

SILICONE = (40, 75, 210)  # blue (food-grade) silicone seal, the new supplier's
POWDER_BLUE = (56, 92, 168)  # blue powder-coated plate


def relight(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The `lighting` drift of one rendered uint8 image: dim, warm colour cast, more noise."""
    gain = R.u(rng, 0.30, 0.45)
    cast = np.array([1.25, 0.95, 0.55], dtype=np.float32) * np.array(
        [R.u(rng, 0.95, 1.05) for _ in range(3)], dtype=np.float32)
    out = img.astype(np.float32) * gain * cast + rng.normal(0, R.u(rng, 3.0, 6.0), img.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _silicone_ring(rng: np.random.Generator, defect: str | None) -> np.ndarray:
    """render.render_ring with a blue silicone ring instead of dark rubber."""
    obj, d = R.layer()
    r_out = R.u(rng, 15, 21)
    r_in = r_out * R.u(rng, 0.58, 0.7)
    rubber = R.shade(R.jitter(SILICONE, rng, 16), R.u(rng, 0.85, 1.1))
    m = R.C / R.SS
    R.circle(d, m, m, r_out, rubber, outline=R.shade(rubber, 0.6), width=0.6)
    hi, mid = R.u(rng, 0, 2 * math.pi), (r_out + r_in) / 2
    d.arc([R.s(m - mid), R.s(m - mid), R.s(m + mid), R.s(m + mid)], math.degrees(hi),
          math.degrees(hi) + R.u(rng, 50, 110), fill=R.shade(rubber, 1.25), width=int(R.s(0.8)))
    R.punch(obj, m, m, r_in)
    if defect is not None:
        a0 = R.u(rng, 0, 2 * math.pi)
        span = math.radians(R.u(rng, 28, 45) if defect == "gap" else R.u(rng, 20, 32))
        inner = r_in if defect == "gap" else r_in + (r_out - r_in) * R.u(rng, 0.3, 0.45)
        d.polygon(R.wedge(m, m, inner, r_out, a0, a0 + span, rng), fill=(0, 0, 0, 0))
    return R.scene(rng, obj, r_out + 1, 0.0)


def _coated_plate(rng: np.random.Generator, holes: int, defect: str | None) -> np.ndarray:
    """render.render_plate with a blue powder-coated plate instead of bare metal."""
    obj, d = R.layer()
    w, h = R.u(rng, 34, 44), R.u(rng, 27, 34)
    x0, y0 = R.C / R.SS - w / 2, R.C / R.SS - h / 2
    paint = R.jitter(POWDER_BLUE, rng, 14)
    d.rounded_rectangle([R.s(x0), R.s(y0), R.s(x0 + w), R.s(y0 + h)], radius=R.s(R.u(rng, 1, 4)),
                        fill=paint, outline=R.shade(paint, 0.55), width=int(R.s(0.8)))
    r = R.u(rng, 2.7, 3.5)
    centres = R.hole_positions(rng, holes, x0, y0, w, h, r)
    if defect is not None:
        obj = R.masked_onto(obj, R.draw_plate_defect(rng, defect, x0, y0, w, h, paint, centres))
        d = ImageDraw.Draw(obj)
    for cx, cy in centres:
        R.circle(d, cx, cy, r, fill=R.jitter((32, 32, 34), rng, 10), outline=R.shade(paint, 0.45), width=0.7)
    return R.scene(rng, obj, math.hypot(w, h) / 2 + 1, R.u(rng, -180, 180))


def _supplier(task_id: str, rng: np.random.Generator, answer: str) -> np.ndarray:
    if task_id == "seal_defect":
        return _silicone_ring(rng, str(rng.choice(R.RING_DEFECTS)) if answer == "yes" else None)
    damaged = answer == "yes" if task_id == "plate_defect" else bool(rng.random() < 0.5)
    holes = int(rng.integers(1, 5)) if task_id == "plate_defect" else int(answer)
    return _coated_plate(rng, holes, str(rng.choice(R.PLATE_DEFECTS)) if damaged else None)


def check_drift(task_id: str, kind: str) -> None:
    get_spec(task_id)
    if kind not in KINDS:
        raise ConfigError(f"drift kind {kind!r} is unknown; use one of {list(KINDS)}")
    if kind == "supplier" and task_id not in SUPPLIER_TASKS:
        raise ConfigError(f"drift 'supplier' exists for {list(SUPPLIER_TASKS)}, not {task_id!r}; "
                          "use drift 'lighting' for it")


def drifted_samples(task_id: str, kind: str, split: str, seed: int, n: int) -> list[Sample]:
    """n drifted samples of a built-in task (balanced answers, the split's phrasings)."""
    check_drift(task_id, kind)
    if split not in _SPLIT_CODE or n < 1:
        raise ConfigError(f"drifted_samples: split must be 'train' or 'test' and n >= 1, got {split!r}, {n}")
    spec = get_spec(task_id)
    code = [seed, TASK_IDS.index(task_id) + 1, _SPLIT_CODE[split], DRIFT_SALT, KINDS.index(kind) + 1]
    order_rng = np.random.default_rng(code + [0])
    answers = balanced(spec.answers, n, order_rng)
    texts = balanced(spec.train_phrasings if split == "train" else spec.test_phrasings, n, order_rng)
    out = []
    for i in range(n):
        rng = np.random.default_rng(code + [i + 1])
        if kind == "lighting":
            image = relight(spec.render(rng, answers[i]), rng)
        else:
            image = _supplier(task_id, rng, answers[i])
        out.append(Sample(image=image, instruction=texts[i], answer=answers[i], task_id=task_id,
                          source=f"drift:{kind}:{task_id}/seed={seed}/{split}#{i}"))
    return out


def drifted_task(task_id: str, kind: str, seed: int = 0, n_train: int = 160, n_test: int = 40) -> Task:
    """The drifted variant of a built-in task: same id, answers and phrasings, drifted images."""
    spec = get_spec(task_id)
    return Task(task_id=task_id, train=drifted_samples(task_id, kind, "train", seed, n_train),
                test=drifted_samples(task_id, kind, "test", seed, n_test), answers=list(spec.answers),
                metric="exact", train_instructions=list(spec.train_phrasings),
                test_instructions=list(spec.test_phrasings), domain=spec.domain)


def write_llava_json(samples: list[Sample], folder: str | Path, unlabelled: int = 0,
                     name: str = "data.json") -> Path:
    """Write samples as LLaVA JSON + PNGs (folder/name, folder/images/), the layout `kaizen hub
    samples export` writes, with a "kaizen" provenance object; the last `unlabelled` records get
    an empty answer (captured but not yet labelled). Returns the JSON path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, s in enumerate(samples):
        buf = io.BytesIO()
        Image.fromarray(s.load_image()).save(buf, format="PNG")
        sid = hashlib.sha256(buf.getvalue() + s.instruction.encode()).hexdigest()
        (folder / "images" / f"{sid}.png").write_bytes(buf.getvalue())
        label = "" if i >= len(samples) - unlabelled else s.answer
        records.append({"id": sid, "image": f"images/{sid}.png",
                        "conversations": [{"from": "human", "value": "<image>\n" + s.instruction},
                                          {"from": "gpt", "value": label}],
                        "kaizen": {"source": s.source, "task": s.task_id, "label_source": "generator" if label else None}})
    path = folder / name
    path.write_text(json.dumps(records, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    """python -m kaizen.trainer.data.drift --out drift.png [--seed 0]: original vs drifted rows."""
    import argparse

    from .synthetic import contact_sheet, make_task

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="kaizen_drift.png")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tasks = []
    for task_id in SUPPLIER_TASKS:
        tasks += [make_task(task_id, a.seed, 8, 1), drifted_task(task_id, "supplier", a.seed, 8, 1),
                  drifted_task(task_id, "lighting", a.seed, 8, 1)]
    Image.fromarray(contact_sheet(tasks, 8)).save(a.out)
    print(f"wrote {a.out}: rows = original / supplier / lighting of {', '.join(SUPPLIER_TASKS)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
