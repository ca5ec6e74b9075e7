"""Labelled samples added to a finished run: reading them, holding a share back, and rebuilding
the run's stream with every earlier addition (used by `kaizen train --continue`).

    added, skipped = read_added("samples/data.json", "seal_defect")   # [(record id, Sample)], unlabelled
    train, held = split_holdout(added, 0.25, seed=0)                   # deterministic by record id
    tasks = rebuild_tasks(session)     # the run's stream + what earlier continue runs added

The file format is LLaVA JSON as `kaizen hub samples export` writes it (trainer/data/llava_json.py);
records with an empty answer are unlabelled and skipped (counted).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kaizen.runtime.errors import ConfigError

from .llava_json import _load_list, _where, first_exchange
from .types import DataError, Sample, Task, check_image_file, unique_in_order


def _unlabelled(record) -> bool:
    """A record whose gpt answer is missing or empty (exported for labelling, not yet labelled)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return False
    gpt = [t for t in turns if isinstance(t, dict) and t.get("from") == "gpt"]
    return not gpt or not str(gpt[0].get("value", "")).strip()


def read_added(path: str | Path, task_id: str) -> tuple[list[tuple[str, Sample]], int]:
    """([(record id, Sample)] of the labelled records, number of unlabelled ones skipped)."""
    path = Path(path)
    out, skipped, seen = [], 0, set()
    for index, record in enumerate(_load_list(path)):
        where = _where(path, index, record)
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        if _unlabelled(record):
            skipped += 1
            continue
        rid, image = str(record.get("id", index)), record.get("image")
        if rid in seen:
            raise DataError(f"{where}: id {rid!r} occurs twice; record ids must be unique")
        seen.add(rid)
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: missing 'image' (the path of the part's image, relative to {path.parent})")
        instruction, answer = first_exchange(record.get("conversations"), where)
        check_image_file(path.parent / image, where)
        out.append((rid, Sample(image=path.parent / image, instruction=instruction, answer=answer,
                                task_id=task_id, source=where)))
    if not out:
        raise DataError(f"{path}: no labelled record ({skipped} unlabelled skipped); label them "
                        "(kaizen hub samples import) before training")
    return out, skipped


def split_holdout(items: list[tuple[str, Sample]], share: float, seed: int):
    """(train, held back): the `share` of records with the smallest sha256(seed:id), at least one
    each when share > 0 and there are >= 2 records."""
    order = sorted(items, key=lambda it: hashlib.sha256(f"{seed}:{it[0]}".encode()).hexdigest())
    n = round(share * len(order))
    if share > 0 and len(order) >= 2:
        n = min(max(n, 1), len(order) - 1)
    held = {rid for rid, _ in order[:n]}
    return [it for it in items if it[0] not in held], [it for it in items if it[0] in held]


def _pick(path: str, ids: list[str], task_id: str) -> list[Sample]:
    """Samples of `ids` from an earlier continue run's added file (for old + new training data)."""
    by_id = dict(read_added(path, task_id)[0])
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ConfigError(f"{path} no longer holds records {missing[:3]} that an earlier continue run trained "
                          "on; restore the file or continue from the earlier run")
    return [by_id[i] for i in ids]


def rebuild_tasks(session) -> list[Task]:
    """The run's stream: the built-in/TOML tasks, old train data + earlier additions, new tasks."""
    tasks = list(session.tasks)
    for extra in session.state.get("extra_tasks", []):
        tasks.append(Task(extra["task_id"], _pick(extra["file"], extra["train_ids"], extra["task_id"]),
                          _pick(extra["file"], extra["test_ids"], extra["task_id"]), answers=extra["answers"]))
    for task_id, adds in session.state.get("added", {}).items():
        t = [x.task_id for x in tasks].index(task_id)
        more = [s for a in adds for s in _pick(a["file"], a["ids"], task_id)]
        tasks[t] = with_train(tasks[t], more)
    return tasks


def with_replay(task: Task, added: list[Sample], replay: int) -> Task:
    """T for a continue run: the added samples registered (a new Task, so its features are computed
    anew) and trained on as T's old train data repeated `replay` times + the added ones."""
    old = list(task.train)
    out = with_train(task, added)
    out.train = old * replay + list(added)
    return out


def with_train(task: Task, more: list[Sample]) -> Task:
    return Task(task.task_id, task.train + more, task.test, answers=task.answers, metric=task.metric,
                train_instructions=unique_in_order(task.train_instructions + [s.instruction for s in more]),
                test_instructions=task.test_instructions, domain=task.domain)
