"""The `realdev` stream: six development tasks on REAL images (OpenClipArt PNGs, MNIST digits).

Sources, caching and the install hints live in realdev_sources.py, drawing the images in
realdev_render.py, raw-pixel baselines in realdev_probe.py. Tasks, in stream order:

    clipart_kind       clip-art object   "What kind of object is this?"   animal food vehicle tool plant
    digit              handwritten digit "Which digit is shown?"          0 1 2 3 4 5 6 7 8 9
    upside_down        clip-art object   "Is the part upside down?"       yes / no (180-degree turn)
    is_food            clip-art object   "Is this item food?"             yes / no
    digit_even         handwritten digit "Is the digit even?"             yes / no
    upside_down_digit  handwritten digit "Is the part upside down?"       yes / no (digits 2 3 4 5 7)

clipart_kind / is_food (and digit / digit_even) share the image domain and differ in question;
upside_down / upside_down_digit share the question phrasings and differ in domain. Each task
has 6 train phrasings and 3 test phrasings never used in training. Answers are balanced (counts
differ by at most one) and so are the object kinds and digits behind each answer. upside_down_digit
leaves out 0 1 8 (the same upside down) and 6 9 (each other upside down); upside_down leaves
out the few drawings that look the same turned or flipped top-bottom (`turn_ambiguous`).

Train and test never share a source image, across the WHOLE stream: clip-art files are split
per label by near-duplicate family (bw/colour, _01/_02 variants), 25% of the files to test;
MNIST digits 80/20 per digit. The split, the picks and the rendering all follow from `seed`.
A split smaller than n reuses its images under a new random placement. Images are uint8
[size, size, 3]: a clip-art drawing (flipped left-right half of the time) at 60-90% of the frame
on one of five light backgrounds, or an MNIST digit in dark ink on paper at 55-85%.

`nomatch_set` gives images and instructions of none of the tasks (buildings, people, office,
electronics, signs clip art and procedural textures; off-task questions), for the no-match
threshold; their answer is "no_match" and task id "nomatch".

    from kaizen.trainer.data.realdev import realdev_stream, nomatch_set
    tasks = realdev_stream(seed=0, n_train=200, n_test=50)
    python -m kaizen.trainer.data.realdev --out realdev.png     # contact sheet + timings
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kaizen.runtime.errors import ConfigError

from . import realdev_sources as S
from .realdev_render import PROCEDURAL, compose_clip, compose_digit, procedural, turn_ambiguous
from .synthetic import balanced
from .types import DataError, Sample, Task

__all__ = ["KINDS", "NOMATCH_ID", "SPECS", "TASK_IDS", "clipart_split", "compose_clip", "compose_digit",
           "image_id", "mnist_split", "nomatch_set", "realdev_stream", "turn_ambiguous"]

KINDS = ("animal", "food", "vehicle", "tool", "plant")
UPSIDE_DIGITS = ("2", "3", "4", "5", "7")
TEST_FRACTION = {"clip": 0.25, "digit": 0.20}
NOMATCH_ID, NOMATCH_ANSWER = "nomatch", "no_match"

UPSIDE_TRAIN = ("Is the part upside down?", "Is this item upside down?",
                "Is the object flipped upside down?", "Is it mounted upside down?",
                "Check the orientation: is it upside down?", "Upside down or upright?")
UPSIDE_TEST = ("Would you say it is upside down?", "Has this been turned upside down?",
               "Is the thing shown rotated by 180 degrees?")


@dataclass(frozen=True)
class RealSpec:
    task_id: str
    domain: str          # "clip" or "digit"
    answers: tuple[str, ...]
    train_phrasings: tuple[str, ...]
    test_phrasings: tuple[str, ...]


SPECS: dict[str, RealSpec] = {s.task_id: s for s in (
    RealSpec("clipart_kind", "clip", KINDS,
             ("What kind of object is this?", "Which category does this item belong to?",
              "Classify the object in the image.", "What type of item is shown?",
              "Is this an animal, food, vehicle, tool or plant?", "Sort this item: which category?"),
             ("Which kind of thing is pictured here?", "Tell me the category of this object.",
              "What class of item do you see?")),
    RealSpec("digit", "digit", tuple("0123456789"),
             ("Which digit is shown?", "What number is written here?", "Read the digit.",
              "What digit is on this tag?", "Which number from 0 to 9 is this?",
              "Identify the handwritten digit."),
             ("Tell me the digit in the image.", "What is the written number?",
              "Which single digit can you read?")),
    RealSpec("upside_down", "clip", ("yes", "no"), UPSIDE_TRAIN, UPSIDE_TEST),
    RealSpec("is_food", "clip", ("yes", "no"),
             ("Is this item food?", "Is this something you can eat?", "Is the object edible?",
              "Does the image show food?", "Is this a food item?", "Can this be eaten?"),
             ("Would you call this food?", "Is what you see something to eat?",
              "Is the pictured item edible food?")),
    RealSpec("digit_even", "digit", ("yes", "no"),
             ("Is the digit even?", "Is this an even number?", "Is the number shown even?",
              "Even digit: yes or no?", "Is the written digit divisible by two?",
              "Does the tag show an even digit?"),
             ("Would you say the digit is even?", "Is the handwritten number an even one?",
              "Can the digit be divided by 2 with no remainder?")),
    RealSpec("upside_down_digit", "digit", ("yes", "no"), UPSIDE_TRAIN, UPSIDE_TEST),
)}
TASK_IDS: tuple[str, ...] = tuple(SPECS)
DOMAIN_NAMES = {"clip": "clip-art object", "digit": "handwritten digit"}
NOMATCH_INSTRUCTIONS = (
    "What is the oven temperature?", "How many people are waiting in the queue?",
    "What time does the clock show?", "Which colour is the wall painted?",
    "Is the conveyor belt running?", "What is the serial number on the label?",
    "How much does this package weigh?", "Is the safety door closed?",
    "What is written on the sign?", "How loud is the machine?",
    "Which floor is the elevator on?", "Is the light switched on?")


def _labels_for(task_id: str, answer: str) -> tuple[str, ...]:
    """The clip-art kinds or digits whose images can carry `answer` in task `task_id`."""
    if task_id in ("clipart_kind", "digit"):
        return (answer,)
    if task_id == "is_food":
        return ("food",) if answer == "yes" else tuple(k for k in KINDS if k != "food")
    if task_id == "digit_even":
        return tuple("02468") if answer == "yes" else tuple("13579")
    return KINDS if task_id == "upside_down" else UPSIDE_DIGITS


def _plan(task_id: str, n: int, rng: np.random.Generator) -> list[tuple[str, str, bool]]:
    """(answer, label, upside_down) per sample; label is a clip-art kind or a digit, balanced
    among the samples of each answer."""
    answers = balanced(SPECS[task_id].answers, n, rng)
    labels = [""] * n
    for answer in SPECS[task_id].answers:
        where = [i for i, a in enumerate(answers) if a == answer]
        for i, label in zip(where, balanced(_labels_for(task_id, answer), len(where), rng)):
            labels[i] = label
    upside = task_id in ("upside_down", "upside_down_digit")
    return [(a, lab, upside and a == "yes") for a, lab in zip(answers, labels)]


def clipart_split(seed: int) -> dict[str, tuple[list[S.ClipSource], list[S.ClipSource]]]:
    """Label -> (train sources, test sources) for the task kinds; whole families go one way."""
    index = S.clipart_index(S.find_sources().clipart)
    out = {}
    for code, label in enumerate(KINDS):
        groups: dict[str, list[S.ClipSource]] = {}
        for src in index[label]:
            groups.setdefault(src.group, []).append(src)
        if len(groups) < 8:
            raise DataError(f"clip-art label {label!r} has only {len(groups)} image families in "
                            f"{S.find_sources().clipart}; the openclipart-png install looks "
                            f"incomplete: reinstall it ({S.CLIPART_HINT})")
        names = sorted(groups)
        want = round(TEST_FRACTION["clip"] * len(index[label]))
        train: list[S.ClipSource] = []
        test: list[S.ClipSource] = []
        for i in np.random.default_rng([seed, 7, code]).permutation(len(names)):
            (test if len(test) < want else train).extend(groups[names[i]])
        out[label] = (train, test)
    return out


def mnist_split(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Digit -> (train indices, test indices) into load_mnist's arrays."""
    _, labels = S.load_mnist(S.find_sources().mnist)
    out = {}
    for d in range(10):
        idx = np.flatnonzero(labels == d)
        idx = idx[np.random.default_rng([seed, 8, d]).permutation(len(idx))]
        k = round(TEST_FRACTION["digit"] * len(idx))
        out[str(d)] = (idx[k:], idx[:k])
    return out


def _cycle(items: list, rng: np.random.Generator, usable, what: str) -> Iterator:
    """Items in a shuffled order, again and again, skipping those `usable` maps to None."""
    order = rng.permutation(len(items))
    while True:
        got = False
        for i in order:
            value = usable(items[i])
            if value is not None:
                got = True
                yield items[i], value
        if not got:
            raise DataError(f"{what}: none of its {len(items)} source images is usable; "
                            f"reinstall the sources ({S.CLIPART_HINT}; {S.MNIST_HINT})")


def _usable(src: S.ClipSource, size: int, task_id: str) -> np.ndarray | None:
    rgba = S.load_clip(src, size)
    if rgba is None or (task_id == "upside_down" and turn_ambiguous(rgba)):
        return None
    return rgba


def _samples(task_id: str, split: str, seed: int, n: int, size: int, clip_split, digit_split) -> list[Sample]:
    spec = SPECS[task_id]
    task_code, split_code = TASK_IDS.index(task_id) + 1, {"train": 1, "test": 2}[split]
    order_rng = np.random.default_rng([seed, task_code, split_code, 0])
    plan = _plan(task_id, n, order_rng)
    texts = balanced(spec.train_phrasings if split == "train" else spec.test_phrasings, n, order_rng)
    part = 0 if split == "train" else 1
    pickers: dict[str, Iterator] = {}
    images = None
    if spec.domain == "clip":
        for code, label in enumerate(KINDS):
            pickers[label] = _cycle(clip_split[label][part], np.random.default_rng(
                [seed, task_code, split_code, 100 + code]), lambda src: _usable(src, size, task_id),
                f"realdev task {task_id!r}, {split} images of {label!r}")
    else:
        images, _ = S.load_mnist(S.find_sources().mnist)
        for d in range(10):
            pickers[str(d)] = _cycle(list(digit_split[str(d)][part]), np.random.default_rng(
                [seed, task_code, split_code, 200 + d]), lambda i: i,
                f"realdev task {task_id!r}, {split} images of digit {d}")
    out = []
    for i, (answer, label, upside) in enumerate(plan):
        src, value = next(pickers[label])
        rng = np.random.default_rng([seed, task_code, split_code, i + 1])
        if spec.domain == "clip":
            pixels, image = compose_clip(value, size, rng, upside), f"clipart:{src.rel}"
        else:
            pixels, image = compose_digit(images[value], size, rng, upside), f"mnist:{label}/{value}"
        out.append(Sample(image=pixels, instruction=texts[i], answer=answer, task_id=task_id,
                          source=f"realdev:{task_id}/seed={seed}/{split}#{i} image={image}"))
    return out


def image_id(sample: Sample) -> str:
    """The source image of a realdev or nomatch sample: "clipart:<rel path>", "mnist:<d>/<i>"
    or "procedural:<kind>/<i>"."""
    return sample.source.rsplit(" image=", 1)[-1]


def _check(n_train: int, n_test: int, size: int) -> None:
    for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("size", size, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"realdev: {name} must be an integer >= {low}, got {value!r}")


def realdev_stream(seed: int = 0, n_train: int = 200, n_test: int = 50, size: int = 224,
                   tasks: tuple[str, ...] = TASK_IDS) -> list[Task]:
    """The realdev tasks in stream order (or the subset `tasks`, in the given order)."""
    _check(n_train, n_test, size)
    unknown = [t for t in tasks if t not in SPECS]
    if unknown:
        raise ConfigError(f"realdev: unknown task {unknown[0]!r}; use some of {list(TASK_IDS)}")
    domains = {SPECS[t].domain for t in tasks}
    clip = clipart_split(seed) if "clip" in domains else None
    digits = mnist_split(seed) if "digit" in domains else None
    out = []
    for t in tasks:
        spec = SPECS[t]
        out.append(Task(t, _samples(t, "train", seed, n_train, size, clip, digits),
                        _samples(t, "test", seed, n_test, size, clip, digits), list(spec.answers),
                        "exact", list(spec.train_phrasings), list(spec.test_phrasings),
                        DOMAIN_NAMES[spec.domain]))
    return out




def nomatch_set(seed: int = 0, n: int = 60, size: int = 224) -> list[Sample]:
    """n samples no task should claim: 3/4 clip art of unused categories, 1/4 procedural
    textures, each with an off-task instruction (NOMATCH_INSTRUCTIONS, balanced)."""
    _check(n, 1, size)
    index = S.clipart_index(S.find_sources().clipart)
    rng = np.random.default_rng([seed, 99, 0])
    labels = list(S.NOMATCH_RULES)
    n_proc = n // 4
    kinds = balanced(tuple(labels), n - n_proc, rng) + balanced(PROCEDURAL, n_proc, rng)
    texts = balanced(NOMATCH_INSTRUCTIONS, n, rng)
    pickers = {lab: _cycle(index[lab], np.random.default_rng([seed, 99, 1 + c]),
                           lambda src: S.load_clip(src, size), f"nomatch images of {lab!r}")
               for c, lab in enumerate(labels)}
    out = []
    for i, kind in enumerate(kinds):
        r = np.random.default_rng([seed, 99, 100 + i])
        if kind in pickers:
            src, rgba = next(pickers[kind])
            pixels, image = compose_clip(rgba, size, r, False), f"clipart:{src.rel}"
        else:
            pixels, image = procedural(kind, size, r), f"procedural:{kind}/seed={seed}/{i}"
        out.append(Sample(image=pixels, instruction=texts[i], answer=NOMATCH_ANSWER,
                          task_id=NOMATCH_ID, source=f"realdev:nomatch/seed={seed}#{i} image={image}"))
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m kaizen.trainer.data.realdev [--out sheet.png]: timings, sizes, a contact sheet."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=50)
    args = ap.parse_args(argv)
    for attempt in ("first", "second"):
        t0 = time.perf_counter()
        tasks = realdev_stream(args.seed, args.n_train, args.n_test)
        print(f"realdev_stream ({attempt} call in this process): {time.perf_counter() - t0:.2f} s")
    for t in tasks:
        print(f"{t.task_id:<18} {t.domain:<18} train={len(t.train)} test={len(t.test)} "
              f"answers={' '.join(t.answers)}")
    if args.out:
        from PIL import Image

        from .synthetic import contact_sheet

        Image.fromarray(contact_sheet(tasks + [Task("nomatch", nomatch_set(args.seed, 8), nomatch_set(
            args.seed, 1))], per_task=8, zoom=1)).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
