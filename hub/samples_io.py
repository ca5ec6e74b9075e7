"""Export captured parts for labelling and import the labels back (`kaizen hub samples export|import`).

    n = export_samples(store, out_dir, task="seal")            # or unmatched=True / every task (task=None)
    # -> out_dir/data.json (LLaVA JSON) + out_dir/images/<sample_id>.png|jpg
    summary = import_labels(store, "labelled.json")            # labels (and tasks) by id, all or nothing

An exported record is what kaizen.trainer.data.llava_json reads, plus a "kaizen" object with the
provenance (task, station, times, reason, the station's answer / task / pack version /
confidence, label source):

    {"id": "<sample_id>", "image": "images/<sample_id>.png",
     "conversations": [{"from": "human", "value": "<image>\\n<instruction>"},
                       {"from": "gpt", "value": "<label, or \\"\\" when unlabelled>"}],
     "kaizen": {"task": "seal", "station_id": "line1/s00", "reason": "low_confidence", ...}}

Import takes the same shape: each record's id must be a stored sample, its gpt turn is the label
("" leaves the sample as it is), and "kaizen": {"task": T} files it under task T (e.g. an
unmatched part that belongs to a new task). The whole file is checked before anything changes;
an error names the file, the record index and the field. No torch here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kaizen.runtime.durable import atomic_write_bytes
from kaizen.runtime.errors import KaizenError

from .samples import MAX_LABEL_CHARS, MAX_NAME_CHARS, UNMATCHED, SampleStore

IMAGE_TOKEN = "<image>"
PROVENANCE = ("task", "station_id", "captured_at", "received_at", "reason", "outcome", "station_answer",
              "station_task", "pack_version", "confidence", "task_hint", "label_source")


class SampleImportError(KaizenError):
    """A labelling file that cannot be imported: names the file, the record and the field."""


def export_record(row: dict) -> dict:
    return {"id": row["sample_id"], "image": f"images/{row['image_file']}",
            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{row['instruction']}"},
                              {"from": "gpt", "value": row["label"] or ""}],
            "kaizen": {k: row[k] for k in PROVENANCE}}


def select_rows(store: SampleStore, *, task: str | None = None, unmatched: bool = False,
                labelled: bool | None = None) -> list[dict]:
    """Rows of one task, of the unmatched ones, or of every task (task None, unmatched False)."""
    return store.rows(task=UNMATCHED if unmatched else task, labelled=labelled)


def export_samples(store: SampleStore, out_dir: str | Path, *, task: str | None = None, unmatched: bool = False,
                   labelled: bool | None = None) -> int:
    """Write out_dir/data.json and out_dir/images/; returns the number of records."""
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = select_rows(store, task=task, unmatched=unmatched, labelled=labelled)
    for row in rows:
        src = store.image_path(row)
        if not src.is_file():
            raise KaizenError(f"{src}: the image of sample {row['sample_id']} is missing from the hub's "
                              "samples_dir; restore it from a backup or remove the row")
        shutil.copyfile(src, images / row["image_file"])
    data = json.dumps([export_record(r) for r in rows], indent=1, ensure_ascii=False)
    atomic_write_bytes(out / "data.json", data.encode())
    return len(rows)


def _label_of(path: Path, index: int, record: dict) -> str:
    where = f"{path} record #{index} (id {record['id']!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise SampleImportError(f"{where}: field 'conversations' must be a list of {{from, value}} objects")
    gpt = [t for t in turns if t.get("from") == "gpt"]
    if not gpt:
        raise SampleImportError(f"{where}: field 'conversations' has no gpt turn: add "
                                "{\"from\": \"gpt\", \"value\": <label>}")
    label = gpt[0].get("value")
    if not isinstance(label, str) or len(label.strip()) > MAX_LABEL_CHARS:
        raise SampleImportError(f"{where}: field 'conversations' gpt 'value' must be a string of at most "
                                f"{MAX_LABEL_CHARS} characters (the label; \"\" = leave unlabelled)")
    return label.strip()


def _task_of(path: Path, index: int, record: dict) -> str | None:
    extra = record.get("kaizen")
    if extra is None:
        return None
    where = f"{path} record #{index} (id {record['id']!r})"
    if not isinstance(extra, dict):
        raise SampleImportError(f"{where}: field 'kaizen' must be an object")
    task = extra.get("task")
    if task is None:
        return None
    if not isinstance(task, str) or not task.strip() or len(task) > MAX_NAME_CHARS:
        raise SampleImportError(f"{where}: field 'kaizen.task' must be a task name of 1..{MAX_NAME_CHARS} "
                                "characters")
    return task.strip()


def import_labels(store: SampleStore, path: str | Path) -> dict:
    """Set labels (label_source "import") and tasks from a labelling file; all or nothing.

    Returns {"labelled": n, "moved": n (task changed), "unchanged": n (no label, same task)}."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SampleImportError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SampleImportError(f"{path}: not valid JSON ({err}); expected the JSON list that "
                                "`kaizen hub samples export` wrote, with labels filled in") from None
    if not isinstance(records, list):
        raise SampleImportError(f"{path}: expected a JSON list of records, got a JSON {type(records).__name__}")
    changes, seen = [], set()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise SampleImportError(f"{path} record #{index}: must be an object, got {type(record).__name__}")
        sid = record.get("id")
        if not isinstance(sid, str):
            raise SampleImportError(f"{path} record #{index}: field 'id' must be the sample id (a string)")
        row = store.get(sid)
        if row is None:
            raise SampleImportError(f"{path} record #{index}: field 'id': no stored sample {sid[:80]!r} at this "
                                    f"hub ({store.root}); import labels on the hub that exported them")
        if sid in seen:
            raise SampleImportError(f"{path} record #{index}: field 'id': sample {sid} appears twice")
        seen.add(sid)
        label, task = _label_of(path, index, record), _task_of(path, index, record)
        changes.append((row, label or None, task))
    summary = {"labelled": 0, "moved": 0, "unchanged": 0}
    updates = []
    for row, label, task in changes:
        moved = task is not None and task != row["task"]
        if label == row["label"]:
            label = None   # unchanged: an operator's label keeps its source
        if label is None and not moved:
            summary["unchanged"] += 1
            continue
        updates.append((row["sample_id"], label, task if moved else None))
        summary["labelled"] += label is not None
        summary["moved"] += moved
    store.set_labels(updates, source="import")
    return summary
