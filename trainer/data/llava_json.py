"""Reader for LLaVA-style JSON task data (the CoIN / MCITlib format).

    [{"id": "q1", "image": "plates/0001.png",
      "conversations": [{"from": "human", "value": "<image>\\nHow many holes?"},
                        {"from": "gpt", "value": "3"}]}, ...]

`image` is relative to an image folder (default: the JSON file's folder). The instruction is
the human turn with the `<image>` placeholder removed. Multi-turn records: only the FIRST
human turn and the first gpt turn after it are used; later turns are ignored.

Every error is a `DataError` that names the file and the record ("train.json record #3
(id 'q4')") and says what to fix: not a JSON list, a record that is not an object, a missing
image field, a missing or unreadable image file, no human turn, no gpt answer after it, an
empty instruction or answer, and an empty file.

    samples = read_llava_json("seal/train.json", images="seal/images", task_id="seal")
"""

from __future__ import annotations

import json
from pathlib import Path

from .types import DataError, Sample, check_image_file

IMAGE_TOKEN = "<image>"


def _where(path: Path, index: int, record: object) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return f"{path} record #{index}" + (f" (id {rid!r})" if rid is not None else "")


def _load_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: LLaVA JSON file not found; check the task's train/test path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); the file must be a JSON list of "
                        "records") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got a JSON "
                        f"{type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the file has no records; a task split needs at least one")
    return data


def first_exchange(conversations: object, where: str) -> tuple[str, str]:
    """(instruction, answer) from the first human turn and the first gpt turn after it."""
    if not isinstance(conversations, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    turns = [t for t in conversations if isinstance(t, dict)]
    if len(turns) != len(conversations):
        raise DataError(f"{where}: every conversation turn must be an object with 'from' and 'value'")
    human = next((k for k, t in enumerate(turns) if t.get("from") == "human"), None)
    if human is None:
        raise DataError(f"{where}: no human turn (a turn with \"from\": \"human\"); add the "
                        "question as the first turn")
    gpt = next((t for t in turns[human + 1:] if t.get("from") == "gpt"), None)
    if gpt is None:
        raise DataError(f"{where}: no gpt answer after the human turn; add a turn "
                        "{\"from\": \"gpt\", \"value\": <answer>}")
    instruction = str(turns[human].get("value", "")).replace(IMAGE_TOKEN, " ").strip()
    answer = str(gpt.get("value", "")).strip()
    if not instruction:
        raise DataError(f"{where}: the human turn has no text besides {IMAGE_TOKEN}")
    if not answer:
        raise DataError(f"{where}: the gpt answer is empty")
    return instruction, answer


def read_llava_json(path: str | Path, images: str | Path | None = None, task_id: str = "task",
                    check_images: bool = True) -> list[Sample]:
    """Samples of one LLaVA JSON file. With check_images, every image file must exist and be
    readable by pillow now (a cheap header check), not halfway through training."""
    path = Path(path)
    image_dir = Path(images) if images is not None else path.parent
    if not image_dir.is_dir():
        raise DataError(f"{path}: image folder {image_dir} does not exist; set 'images' to the "
                        "folder the records' image paths are relative to")
    samples = []
    for index, record in enumerate(_load_list(path)):
        where = _where(path, index, record)
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        image = record.get("image")
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: missing 'image' (text-only records are not supported)")
        instruction, answer = first_exchange(record.get("conversations"), where)
        image_path = image_dir / image
        if check_images:
            check_image_file(image_path, where)
        samples.append(Sample(image=image_path, instruction=instruction, answer=answer,
                              task_id=task_id, source=where))
    return samples
