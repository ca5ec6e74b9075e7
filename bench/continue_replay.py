"""How `kaizen train --continue` trades the drifted parts against the original ones: replay factor,
learning rate and seed, measured on the trainer (the stations reproduce these answers: the demo's
agreement and improvement-loop checks).

    .venv/bin/python bench/continue_replay.py --run WORK/runs/kaizen --add WORK/improve/labelled/data.json \
        --variants '[{"replay": 1}, {"replay": 2}, {"replay": 2, "seed": 1}, {"replay": 2, "lr": 0.001}]'

For each variant (keys: replay, lr, seed, epochs, train = "lora" or e.g. "prompt,lora"; absent:
as `kaizen train --continue` defaults): restore RUN's method, train the task as `kaizen train
--continue` does (old data x replay + the added parts minus the 25 % held back, fused as at the
stations), then
accuracy on the task's own test set, the held-back added parts, 200 fresh drifted parts and 200
fresh original parts (the demo's improvement-loop sets: drift seed 100, original seed 200).
Prints one markdown row per variant (v1 first). WORK is a `kaizen demo --work` folder after a run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kaizen.trainer import continue_run as cr
from kaizen.trainer.data.added import read_added, rebuild_tasks, split_holdout, with_replay
from kaizen.trainer.data.drift import drifted_task
from kaizen.trainer.data.synthetic import make_task
from kaizen.trainer.data.types import Task
from kaizen.trainer.metrics import accuracy
from kaizen.trainer.train import Session


def accuracy_on(method, session, tasks, t: int, samples, name: str) -> float:
    probe = Task(name, samples, samples)
    answers, _ = cr.predict(method, session.features, tasks + [probe], len(tasks))
    return accuracy(answers, [s.answer for s in samples], tasks[t].metric)


def measure(run: str, add: str, task: str, drift: str, variant: dict) -> dict:
    session = Session.from_run(run, None)
    tasks = rebuild_tasks(session)
    t = [x.task_id for x in tasks].index(task)
    train_items, held = split_holdout(read_added(add, task)[0], 0.25, 0)
    session.tasks = tasks
    method = session.restore(len(tasks) - 1)
    torch.set_num_threads(session.cfg.threads)
    epochs = variant.get("epochs", session.cfg.epochs)
    if epochs:
        replay = variant.get("replay") or cr.replay_factor(len(tasks[t].train), len(train_items))
        tasks[t] = with_replay(tasks[t], [s for _, s in train_items], replay)
        train = variant.get("train")  # as --train: e.g. "lora" or "prompt,lora"; absent = its default
        parts = tuple(train.split(",")) if train else cr.default_parts(method)
        groups = cr.reopen(method, t, parts, variant.get("lr", cr.default_lr(method, session.cfg.lr)))
        cr.fit(method, session.features, tasks, t, groups, epochs, session.cfg.batch_size, variant.get("seed", 0),
               cr.continue_loss)
    drifted = drifted_task(task, drift, seed=100, n_train=1, n_test=200).test
    original = make_task(task, 200, n_train=1, n_test=200).test
    return {"test": accuracy_on(method, session, tasks, t, tasks[t].test, "test"),
            "heldout": accuracy_on(method, session, tasks, t, [s for _, s in held], "held"),
            "drifted_200": accuracy_on(method, session, tasks, t, drifted, "drifted"),
            "original_200": accuracy_on(method, session, tasks, t, original, "original")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--add", required=True)
    ap.add_argument("--task", default="seal_defect")
    ap.add_argument("--drift", default="supplier")
    ap.add_argument("--variants", default='[{"replay": 1}, {"replay": 2}]', help="JSON list of {replay, lr, seed, epochs, train}")
    a = ap.parse_args()
    print("| variant | test set | held-back added | 200 drifted | 200 original | s |\n|---|---|---|---|---|---|")
    for v in [{"epochs": 0}] + json.loads(a.variants):
        start = time.perf_counter()
        r = measure(a.run, a.add, a.task, a.drift, v)
        name = "v1" if v.get("epochs") == 0 else json.dumps(v)
        print(f"| {name} | {r['test']:.1f} | {r['heldout']:.1f} | {r['drifted_200']:.1f} | {r['original_200']:.1f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
