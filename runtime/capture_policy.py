"""What the Station captures and remembers for feedback (the improvement loop's station side).

    policy = CapturePolicy(confidence=0.5, task_confidence={"seal": 0.8})
    policy.reason(result)          # -> "no_match" | "low_confidence" | None (not captured)
    recent = RecentParts(256)      # the last parts answered: part_id -> (image, instruction, result)
    recent.put(part_id, image, instruction, result); recent.get(part_id)
    kept_image(image, decoded)     # what is kept of a part: bytes as sent, an array (copy), or decoded
    check_feedback(answer, task)   # -> (answer, task) stripped, or InputError saying what to fix

The queue itself (disk, writer thread) is runtime/capture.py; the wire side is runtime/endpoint.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import InputError

MAX_ANSWER_CHARS = 200
MAX_TASK_CHARS = 128


def _check_level(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class CapturePolicy:
    """Capture no-match parts, and answered parts whose confidence is below their task's level."""

    confidence: float = 0.5
    task_confidence: dict = field(default_factory=dict)   # task id -> level (overrides `confidence`)

    def __post_init__(self) -> None:
        _check_level("capture confidence", self.confidence)
        for task, level in self.task_confidence.items():
            _check_level(f"capture confidence of task {task!r}", level)

    def level(self, task_id: str | None) -> float:
        return float(self.task_confidence.get(task_id, self.confidence))

    def reason(self, result: dict) -> str | None:
        if result.get("outcome") == "no_match":
            return "no_match"
        if result.get("outcome") == "answered" and float(result.get("confidence", 0.0)) < self.level(result.get("task_id")):
            return "low_confidence"
        return None


def _image_bytes(image) -> int:
    if isinstance(image, Image.Image):
        return image.width * image.height * 4
    return int(image.nbytes) if isinstance(image, np.ndarray) else len(image)


def kept_image(image, decoded):
    """What the station keeps of a part for capture and feedback: encoded bytes as sent, a raw
    array (copied unless read-only, as arrays from the wire are: a caller may reuse its buffer),
    or the `decoded` image for anything else (a path, a PIL image)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        return image.copy() if image.flags.writeable else image
    return decoded


class RecentParts:
    """A thread-safe LRU of the last parts (bounded by count and by image bytes), so a `feedback`
    by part_id needs no image resend. Images are kept as given (encoded bytes or a decoded copy)."""

    def __init__(self, max_items: int = 256, max_bytes: int = 256 << 20):
        if max_items <= 0 or max_bytes <= 0:
            raise ValueError(f"RecentParts needs max_items and max_bytes > 0, got {max_items}, {max_bytes}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._parts: OrderedDict[str, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, part_id: str, image, instruction: str, result: dict) -> None:
        size = _image_bytes(image)
        if size > self.max_bytes:
            return
        with self._lock:
            self._parts[part_id] = (image, instruction, result, size)
            self._bytes += size
            while len(self._parts) > self.max_items or self._bytes > self.max_bytes:
                self._bytes -= self._parts.popitem(last=False)[1][3]

    def get(self, part_id: str) -> tuple | None:
        """(image, instruction, result) of a recent part, or None if unknown or expired."""
        with self._lock:
            entry = self._parts.get(part_id)
        return None if entry is None else entry[:3]

    def __len__(self) -> int:
        return len(self._parts)


def check_feedback(answer, task) -> tuple[str, str | None]:
    """The feedback's answer and task, stripped; InputError when unusable."""
    if not isinstance(answer, str) or not answer.strip():
        raise InputError("feedback answer is empty: send the correct answer for the part")
    if len(answer.strip()) > MAX_ANSWER_CHARS:
        raise InputError(f"feedback answer is {len(answer.strip())} characters, over the limit of "
                         f"{MAX_ANSWER_CHARS}: send the short answer the task gives (e.g. 'yes', 'torn')")
    if task is not None and (not isinstance(task, str) or not task.strip() or len(task) > MAX_TASK_CHARS):
        raise InputError(f"feedback task must be a task id of 1..{MAX_TASK_CHARS} characters or absent, "
                         f"got {task!r}")
    return answer.strip(), None if task is None else task.strip()
