"""Core data types of a task stream: `Sample`, `Task`, `DataError` and `normalize_answer`.

numpy + pillow + stdlib only (no torch), so data loading and its tests stay fast.

    from kaizen.trainer.data.types import Sample, Task
    s = Sample(image=Path("img/0.png"), instruction="How many holes?", answer="3",
               task_id="holes", source="train.json#rec-0")
    pixels = s.load_image()          # uint8 [H, W, 3]; InputError names the file and the record
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from kaizen.runtime.errors import ConfigError, InputError, KaizenError
from kaizen.runtime.preprocess import upright

# Metrics a task may declare; trainer/metrics.py implements each (a test binds the two lists).
KNOWN_METRICS = ("exact", "contains")

_PUNCT = set(string.punctuation)


class DataError(KaizenError):
    """Task data is unusable (bad JSON record, missing image, empty task...). The message names
    the file and the record id or index, and says what to fix."""


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (ASCII and Unicode), collapse whitespace.

    "  Upside-Down. " -> "upside down"; "3!" -> "3". Used by the exact-match metric.
    """
    out = []
    for ch in unicodedata.normalize("NFKC", str(text)).lower():
        if ch in _PUNCT or unicodedata.category(ch).startswith("P"):
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def _check_pixels(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3 or 0 in arr.shape:
        raise InputError(f"{where}: image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


@dataclass(eq=False)
class Sample:
    """One image + instruction -> answer example.

    `image` is either pixels (uint8 [H, W, 3]) or the path of an image file, read lazily by
    `load_image`. `source` says where the sample came from ("train.json#id=42"), for errors.
    """

    image: np.ndarray | Path
    instruction: str
    answer: str
    task_id: str
    source: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.image, str):
            self.image = Path(self.image)
        if not isinstance(self.image, (np.ndarray, Path)):
            raise DataError(f"{self.source}: image must be a numpy array or a path, "
                            f"got {type(self.image).__name__}")
        if not str(self.instruction).strip():
            raise DataError(f"{self.source}: empty instruction")
        if not str(self.answer).strip():
            raise DataError(f"{self.source}: empty answer")

    def load_image(self) -> np.ndarray:
        """Return the pixels as uint8 [H, W, 3] RGB. A missing or unreadable file raises
        `InputError` naming the file and the record."""
        if isinstance(self.image, np.ndarray):
            return _check_pixels(self.image, self.source)
        return read_rgb(self.image, self.source)


def read_rgb(path: Path, source: str = "") -> np.ndarray:
    """Open an image file with pillow and return uint8 [H, W, 3] RGB, upright by its EXIF
    orientation as the station reads it (kaizen.runtime.preprocess.upright)."""
    where = f"{source}: " if source else ""
    if not path.is_file():
        raise InputError(f"{where}image file {path} does not exist; fix the record's image "
                         "path or the images folder")
    try:
        with Image.open(path) as im:
            return np.asarray(upright(im).convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"{where}image file {path} is not a readable image ({err}); "
                         "replace or remove it") from err


def check_image_file(path: Path, source: str) -> None:
    """Raise DataError unless `path` exists and pillow can parse it (header check, cheap)."""
    if not path.is_file():
        raise DataError(f"{source}: image file {path} does not exist; fix the image path or "
                        "the images folder")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{source}: image file {path} is not a readable image ({err}); "
                        "replace or remove it") from err


def unique_in_order(items: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


@dataclass(eq=False)
class Task:
    """One task of a stream: its train and test samples and how it is scored.

    `answers` is the closed answer set (constrained decoding, balance checks) or None for
    free-form answers. `train_instructions` / `test_instructions` default to the distinct
    instructions of the samples, in order of appearance.
    """

    task_id: str
    train: list[Sample]
    test: list[Sample]
    answers: list[str] | None = None
    metric: str = "exact"
    train_instructions: list[str] = field(default_factory=list)
    test_instructions: list[str] = field(default_factory=list)
    domain: str = ""

    def __post_init__(self) -> None:
        if not self.task_id or not str(self.task_id).strip():
            raise ConfigError("task_id must be a non-empty string")
        for split in ("train", "test"):
            if not getattr(self, split):
                raise DataError(f"task {self.task_id!r}: the {split} split is empty; give it "
                                "at least one sample")
        if self.metric not in KNOWN_METRICS:
            raise ConfigError(f"task {self.task_id!r}: unknown metric {self.metric!r}; "
                              f"use one of {list(KNOWN_METRICS)}")
        if self.answers is not None:
            self.answers = [str(a) for a in self.answers]
            if not self.answers:
                raise ConfigError(f"task {self.task_id!r}: answers is an empty list; give the "
                                  "closed answer set or leave it out for free-form answers")
            allowed = {normalize_answer(a) for a in self.answers}
            for s in self.train + self.test:
                if normalize_answer(s.answer) not in allowed:
                    raise DataError(f"{s.source}: answer {s.answer!r} is not in task "
                                    f"{self.task_id!r}'s answer set {self.answers}")
        if not self.train_instructions:
            self.train_instructions = unique_in_order([s.instruction for s in self.train])
        if not self.test_instructions:
            self.test_instructions = unique_in_order([s.instruction for s in self.test])

    def __repr__(self) -> str:
        return (f"Task({self.task_id!r}, train={len(self.train)}, test={len(self.test)}, "
                f"answers={self.answers}, metric={self.metric!r}, domain={self.domain!r})")
