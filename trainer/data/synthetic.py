"""The built-in synthetic inspection stream: six tasks about parts, rendered from a seed.

Deterministic (same seed -> byte-identical images), 64x64 RGB uint8 images drawn with numpy +
pillow (trainer/data/render.py) with random position, size, rotation, bench texture, lighting
and noise. Tasks, in stream order:

    seal_defect        rubber seal ring   "Is this part damaged?" family     yes / no
    hole_count         metal plate        how many holes                     1 2 3 4
    cable_color        cable              which colour                       red green blue yellow
    plate_defect       metal plate        "Is this part damaged?" family     yes / no
    label_orientation  printed label      how is the label turned            up down left right
    part_type          loose hardware     which part                         bolt nut washer gear

seal_defect and plate_defect share their question phrasings (only the image tells them apart);
hole_count and plate_defect share the image domain, drawn from the same distribution (plates
with 1-4 holes, half of them damaged), so only the question tells them apart. Each task has 6
train phrasings and 3 test phrasings that never occur in training. Answers are balanced
(counts differ by at most one). "left" means the label is turned 90 degrees counter-clockwise
(its top edge, the dark band, is on the left); "right" is 90 degrees clockwise.

    from kaizen.trainer.data.synthetic import inspection_stream
    tasks = inspection_stream(seed=0, n_train=200, n_test=50)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kaizen.runtime.errors import ConfigError

from . import render as R
from .types import Sample, Task

DAMAGE_TRAIN = (
    "Is this part damaged?",
    "Is the part defective?",
    "Does this part have a defect?",
    "Is there any damage on this part?",
    "Is the part in the image damaged or not?",
    "Check the part: is it defective?",
)
DAMAGE_TEST = (
    "Would you say this part is damaged?",
    "Can you see a defect on the part?",
    "Is a defect visible on this part?",
)


def _seal(rng: np.random.Generator, answer: str) -> np.ndarray:
    return R.render_ring(rng, str(rng.choice(R.RING_DEFECTS)) if answer == "yes" else None)


def _plate_defect_kind(rng: np.random.Generator, damaged: bool) -> str | None:
    return str(rng.choice(R.PLATE_DEFECTS)) if damaged else None


def _holes(rng: np.random.Generator, answer: str) -> np.ndarray:
    damaged = bool(rng.random() < 0.5)  # same plate distribution as plate_defect
    return R.render_plate(rng, int(answer), _plate_defect_kind(rng, damaged))


def _plate(rng: np.random.Generator, answer: str) -> np.ndarray:
    holes = int(rng.integers(1, 5))
    return R.render_plate(rng, holes, _plate_defect_kind(rng, answer == "yes"))


@dataclass(frozen=True)
class SyntheticSpec:
    """One built-in task: its domain, closed answer set, phrasings and image renderer."""

    task_id: str
    domain: str
    answers: tuple[str, ...]
    train_phrasings: tuple[str, ...]
    test_phrasings: tuple[str, ...]
    render: Callable[[np.random.Generator, str], np.ndarray]  # (rng, answer) -> uint8 image


SPECS: dict[str, SyntheticSpec] = {spec.task_id: spec for spec in (
    SyntheticSpec("seal_defect", "rubber seal ring", ("yes", "no"), DAMAGE_TRAIN, DAMAGE_TEST, _seal),
    SyntheticSpec(
        "hole_count", "metal plate", ("1", "2", "3", "4"),
        ("How many holes does this plate have?",
         "Count the holes in the plate.",
         "What is the number of holes in the metal plate?",
         "How many holes are drilled in this part?",
         "Count the holes: how many are there?",
         "How many holes can you see on the plate?"),
        ("Tell me the number of holes in this plate.",
         "How many drilled holes does the metal part show?",
         "What is the hole count of the plate?"),
        _holes),
    SyntheticSpec(
        "cable_color", "cable", ("red", "green", "blue", "yellow"),
        ("What colour is the cable?",
         "Which colour is this cable?",
         "What is the color of the cable?",
         "Name the colour of the cable.",
         "The cable in the image is which color?",
         "Identify the cable colour."),
        ("Tell me the color of this cable.",
         "What colour of cable is shown?",
         "Which color does the cable have?"),
        lambda rng, answer: R.render_cable(rng, answer)),
    SyntheticSpec("plate_defect", "metal plate", ("yes", "no"), DAMAGE_TRAIN, DAMAGE_TEST, _plate),
    SyntheticSpec(
        "label_orientation", "printed label", ("up", "down", "left", "right"),
        ("How is the label oriented?",
         "Which way is the label facing?",
         "What is the orientation of the label?",
         "Is the label upright, upside down, or rotated?",
         "In which direction is the label turned?",
         "Describe the orientation of the printed label."),
        ("Which direction does the label point?",
         "How is this printed label turned?",
         "Tell me the label orientation."),
        lambda rng, answer: R.render_label(rng, answer)),
    SyntheticSpec(
        "part_type", "loose hardware", ("bolt", "nut", "washer", "gear"),
        ("What type of part is this?",
         "Which kind of part is shown?",
         "Identify the part.",
         "What kind of hardware is this?",
         "Name the part in the image.",
         "Is this a bolt, nut, washer or gear?"),
        ("What sort of part do you see?",
         "Tell me which part this is.",
         "Which type of hardware part is in the image?"),
        lambda rng, answer: R.render_part(rng, answer)),
)}
TASK_IDS: tuple[str, ...] = tuple(SPECS)
_SPLIT_CODE = {"train": 1, "test": 2}


def get_spec(task_id: str) -> SyntheticSpec:
    if task_id not in SPECS:
        raise ConfigError(f"unknown built-in synthetic task {task_id!r}; use one of {list(TASK_IDS)}")
    return SPECS[task_id]


def instructions(task: str | Task) -> tuple[list[str], list[str]]:
    """(train phrasings, test phrasings) of a built-in task, given its id or its Task."""
    spec = get_spec(task if isinstance(task, str) else task.task_id)
    return list(spec.train_phrasings), list(spec.test_phrasings)


def balanced(items: tuple[str, ...], n: int, rng: np.random.Generator) -> list[str]:
    """n items cycling through `items` (counts differ by at most one), in shuffled order."""
    out = [items[i % len(items)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def make_samples(task_id: str, split: str, seed: int, n: int) -> list[Sample]:
    """The `split` ("train" or "test") samples of one built-in task. Image i is drawn from its
    own generator seeded by (seed, task, split, i), so it does not depend on the other images."""
    spec = get_spec(task_id)
    if split not in _SPLIT_CODE:
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if n < 1:
        raise ConfigError(f"task {task_id!r}: n_{split} must be >= 1, got {n}")
    task_code, split_code = TASK_IDS.index(task_id) + 1, _SPLIT_CODE[split]
    order_rng = np.random.default_rng([seed, task_code, split_code, 0])
    answers = balanced(spec.answers, n, order_rng)
    phrasings = spec.train_phrasings if split == "train" else spec.test_phrasings
    texts = balanced(phrasings, n, order_rng)
    samples = []
    for i in range(n):
        rng = np.random.default_rng([seed, task_code, split_code, i + 1])
        samples.append(Sample(image=spec.render(rng, answers[i]), instruction=texts[i],
                              answer=answers[i], task_id=task_id,
                              source=f"synthetic:{task_id}/seed={seed}/{split}#{i}"))
    return samples


def make_task(task_id: str, seed: int = 0, n_train: int = 200, n_test: int = 50) -> Task:
    """One built-in task with n_train + n_test rendered samples."""
    spec = get_spec(task_id)
    return Task(task_id=task_id, train=make_samples(task_id, "train", seed, n_train),
                test=make_samples(task_id, "test", seed, n_test), answers=list(spec.answers),
                metric="exact", train_instructions=list(spec.train_phrasings),
                test_instructions=list(spec.test_phrasings), domain=spec.domain)


def inspection_stream(seed: int = 0, n_train: int = 200, n_test: int = 50,
                      tasks: tuple[str, ...] = TASK_IDS) -> list[Task]:
    """The six built-in tasks in stream order (or the subset `tasks`, in the given order)."""
    return [make_task(t, seed, n_train, n_test) for t in tasks]


def contact_sheet(tasks: list[Task], per_task: int = 8, zoom: int = 2) -> np.ndarray:
    """One row per task of its first `per_task` train images, uint8 [rows*64*zoom, cols*64*zoom, 3]."""
    rows = []
    for task in tasks:
        imgs = [s.load_image() for s in task.train[:per_task]]
        imgs += [np.zeros_like(imgs[0])] * (per_task - len(imgs))
        rows.append(np.concatenate(imgs, axis=1))
    sheet = np.concatenate(rows, axis=0)
    return sheet.repeat(zoom, axis=0).repeat(zoom, axis=1)


def main(argv: list[str] | None = None) -> int:
    """python -m kaizen.trainer.data.synthetic --out sheet.png [--seed 0]: save a contact sheet."""
    import argparse

    from PIL import Image

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="kaizen_stream.png")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-task", type=int, default=8)
    args = ap.parse_args(argv)
    tasks = inspection_stream(args.seed, n_train=args.per_task, n_test=1)
    Image.fromarray(contact_sheet(tasks, args.per_task)).save(args.out)
    for t in tasks:
        print(f"{t.task_id:<18} answers: {' '.join(s.answer for s in t.train)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
