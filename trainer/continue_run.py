"""`kaizen train --continue`: the next version of one task's pack from captured, labelled samples.

    kaizen train --continue RUN --task seal_defect --add samples/data.json [--out OUT]
                 [--holdout 0.25] [--epochs N] [--lr LR] [--seed S] [--train lora|prompt,lora|...]
                 [--replay N]
    kaizen train --continue RUN --new-task gasket_defect --add unmatched/data.json [--out OUT]

--task T: restore the method after RUN's last task, re-open T and train ONLY T's own parameters
(--train: by default its LoRA, and its prompt too when the run fuses one pack per part,
top_k 1: see default_parts; its key on request) on T's old train data (the
stream's, plus what earlier continue runs added) + the added samples, except a deterministic
share (--holdout, chosen by sha256 of seed and record id, so it does not depend on record
order) held back for evaluation. The old data is replayed (--replay, default auto: repeated
ceil(added / old) times per epoch) so that it weighs at least as much as the added parts.
Other tasks' parameters never change, and their pack files are copied byte for byte.
Why not the key, and the prompt only with top_k 1: selection (which packs a part picks, and the top-k prompts fused
for it) depends on every key, so a moved key can change other tasks' answers; with the key
frozen, parts of other tasks whose top-k contains T still change when T's prompt does (it is
fused into them); T's LoRA is used only for parts that select T (top-1), so other tasks' answers
stay bit-identical. Measured on the demo's real-fast base (seed 0, 160/40, 30 epochs), blue
silicone seals (drift "supplier"), 240 labelled drifted parts (180 trained, 60 held back),
drifted test 200 parts: LoRA only 56.0 -> 79.0 %, held back 51.7 -> 83.3 %, other tasks 0 answers
changed; prompt + LoRA (lr 1e-3, 160 parts): 55.0 -> 81.3 % on 80 drifted parts, but 2 answers
of other tasks changed. Training fuses as the stations do: [P_T] + the k-1 best other prompts.
--new-task NAME: append a task to the stream from labelled samples: its answer set is the
labels seen, its test split the held-back share; it trains like any task (prompt, key, LoRA).

Versions: a run written by `kaizen train` holds version 1 of every task's pack (what `kaizen
export pack` and the demo publish by default). A continue run records `versions` {task: N} in
its run.json and writes `version` into T's pack_meta.json; it makes N+1 where N is T's version
in the run it continues (a new task starts at 1). `kaizen export pack OUT T` exports that
version unless --version says otherwise.

OUT (default RUN/continue/T-v<N+1>) is a run folder: run.json (+ versions, parent, added data),
tasks/<i>_<task>/ for every task (T's rewritten; the last task's state.safetensors holds the
whole new method state, so OUT can be continued again; everything else copied), continue.json:
before/after accuracy on T's test set, on the held-back added samples and on every other task
(with how many of their answers changed). Unlabelled records (empty gpt answer, as `kaizen hub
samples export` writes them) are skipped and counted; a file with no usable record is an error.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kaizen.runtime.errors import ConfigError
from kaizen.runtime.manifest import TASK_ID_RE

from . import checkpoint as ck
from .data.added import read_added, rebuild_tasks, split_holdout, with_replay
from .data.types import DataError, Task, normalize_answer
from .methods.modalprompt import _unit, torch_scores, torch_split_keys, torch_top_k
from .metrics import accuracy
from .pack_meta import write_pack_meta

TRAINABLE = ("prompt", "lora", "key")


@dataclass
class ContinueConfig:
    run: str
    add: str
    task: str = ""
    new_task: str = ""
    out: str = ""
    holdout: float = 0.25
    epochs: int = 0  # 0 = the run's epochs
    lr: float = 0.0  # 0 = default_lr: the run's learning rate (a third of it with prompt nets)
    seed: int = 0
    train: str = ""      # which of T's parameters train (--task); "" = auto (default_parts); a new task trains all three
    replay: int = 0      # times T's old train data is repeated per epoch; 0 = auto (see replay_factor)

    def __post_init__(self):
        self.parts = tuple(x.strip() for x in self.train.split(",") if x.strip())
        if (self.train.strip() and not self.parts) or set(self.parts) - set(TRAINABLE):
            raise ConfigError(f"--train {self.train!r}: give a comma list of {list(TRAINABLE)}")
        if bool(self.task) == bool(self.new_task):
            raise ConfigError("train --continue needs exactly one of --task T (next version) or --new-task NAME")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"--holdout must be in [0, 1), got {self.holdout}")
        if self.new_task and not TASK_ID_RE.match(self.new_task):
            raise ConfigError(f"--new-task {self.new_task!r}: a task id is lower-case letters, digits, '_' "
                              "and '-' (at most 64, starting with a letter or digit), as packs require")
        if self.new_task and self.holdout <= 0.0:
            raise ConfigError("--new-task needs --holdout > 0: the held-back samples are its test split")
        if self.lr < 0:
            raise ConfigError(f"--lr must be > 0 (or 0 = the run's), got {self.lr}")
        if self.replay < 0:
            raise ConfigError(f"--replay must be >= 1 (or 0 = auto: old data at least as often as new), got {self.replay}")
        if self.epochs < 0:
            raise ConfigError(f"--epochs must be >= 1 (or 0 = the run's), got {self.epochs}")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(method, features, tasks: list[Task], i: int, batch_size: int = 32):
    """(answers, selected task indices) of the full method (selection + fusion) on tasks[i].test."""
    refs = [(i, j) for j in range(len(tasks[i].test))]
    answers, picked = [], []
    for s in range(0, len(refs), batch_size):
        pred = method.predict(features.batch(tasks, refs[s:s + batch_size], "test"))
        answers += pred.answers
        picked += pred.selected
    return answers, picked


def snapshot(method, features, tasks: list[Task], t: int, heldout: Task | None) -> dict:
    """Accuracy (+ selection) on every task's test set and on the held-back added samples (a probe
    task whose test split they are, evaluated with the full method: selection, fusion, LoRA)."""
    out = {"tasks": {}, "answers": {}}
    probe = [heldout] if heldout is not None else []
    for i, task in enumerate(tasks + probe):
        answers, picked = predict(method, features, tasks + probe, i)
        want = t if i == len(tasks) else i
        r = {"acc": accuracy(answers, [s.answer for s in task.test], task.metric),
             "selection": 100.0 * sum(p == want for p in picked) / len(picked), "n": len(picked)}
        if i == len(tasks):
            out["heldout"] = r
        else:
            out["tasks"][task.task_id] = r
            out["answers"][task.task_id] = [f"{a}|{p}" for a, p in zip(answers, picked)]
    return out


# --------------------------------------------------------------------------- training


def replay_factor(n_old: int, n_new: int) -> int:
    """How often the task's old train data is repeated per epoch: enough that the old parts weigh
    at least as much as the added ones (ceil(new / old), at least 1). Without it, 300 added parts
    against 160 old ones cost 3 of the 40 original test parts (97.5 -> 90.0 %); repeated twice,
    one (95.0 %), while the drifted parts gained as much (79.5 / 79.0 %); see the docstring."""
    return max(1, -(-n_new // max(n_old, 1)))


def default_parts(method) -> tuple[str, ...]:
    """What --train defaults to: every parameter of T that only parts selecting T use. With top_k 1
    the stations answer a part with its selected pack's prompt and LoRA alone, so T's prompt is
    safe to train too (measured on the demo's top_k-1 run, seed 0: prompt + LoRA 56.5 -> 79.0 % on
    drifted parts, 97.5 -> 95.0 on the 40 original test parts, against LoRA only 74.5 and 90.0);
    with top_k > 1 T's prompt is fused into other tasks' parts, so only the LoRA trains."""
    return ("prompt", "lora") if method.cfg.top_k == 1 else ("lora",)


def default_lr(method, run_lr: float) -> float:
    """--lr's default for --task: the run's learning rate, a third of it when the run's prompts are
    image-conditioned (prompt_net). Measured on the demo's prompt_net run, seeds 0-2 (README, the
    improvement loop): at 1e-3 the drifted parts gain +22.0 on average and the 200 original parts
    stay within 0.5 point (99.0 / 99.5 / 99.5 from 99.5); at the run's 3e-3, +21.8 but the original
    parts lose 1.5 (96.5 in one seed). Without prompt nets 1e-3 was no better, so those keep 3e-3."""
    return run_lr / 3 if len(getattr(method, "nets", ())) else run_lr


def reopen(method, t: int, parts: tuple[str, ...], lr: float) -> list[dict]:
    """Make task t's own parameters `parts` (prompt, key, lora) trainable again; return their
    optimizer groups (prompt and key at lr * prompt_lr_mult, as in training)."""
    if "lora" in parts and not method.per_task_lora:
        raise ConfigError(f"method {method.name} has no per-task LoRA; train prompt and/or key")
    method.current = t
    fast = [p for name, p in (("prompt", method.prompts[t]), ("key", method.keys[t])) if name in parts]
    if "prompt" in parts and len(method.nets):  # an image-conditioned prompt trains with its meta-net
        fast += list(method.nets[t].parameters())
    groups = [{"params": fast, "lr": lr * method.cfg.prompt_lr_mult}] if fast else []
    if "lora" in parts:
        groups.append({"params": list(method.adapters[t].parameters()), "lr": lr})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def fused_prompts(method, batch, t: int) -> list[torch.Tensor]:
    """[P_t] + the k-1 best OTHER tasks' prompts by score (detached): what the station fuses for a
    part that selects t (first training only saw earlier tasks' prompts; the continue run knows
    every task's key, so it trains in the fusion the stations actually run)."""
    extra = min(method.cfg.top_k, len(method.keys)) - 1
    own = method.prompt_for(t, batch.clip_img)
    if extra == 0:
        return list(own)
    keys = torch.stack(list(method.keys)).detach()
    scores = torch_scores(batch.clip_img, batch.clip_txt, keys, method.cfg.alpha)
    scores[:, t] = -float("inf")
    return method.fused(own, torch_top_k(scores, extra).tolist(), batch.clip_img)


def continue_loss(method, batch, t: int) -> torch.Tensor:
    """The method's training loss for task t (CE with t's LoRA + key terms), fused as at inference."""
    adapters = [method.adapters[t]] if method.per_task_lora else None
    ce = method.loss_with(batch, fused_prompts(method, batch, t), adapters)
    k_img, k_txt = torch_split_keys(method.keys[t], batch.clip_img.shape[-1], batch.clip_txt.shape[-1])
    return ce + (1 - batch.clip_img @ _unit(k_img)).mean() + (1 - batch.clip_txt @ _unit(k_txt)).mean()


def fit(method, features, tasks: list[Task], t: int, groups: list[dict], epochs: int, batch_size: int,
        seed: int, loss_fn=None) -> dict:
    """Train task t's parameter groups on tasks[t].train for `epochs` (shuffled per epoch) with
    `loss_fn(method, batch, t)` (default: the method's own training step)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed * 1_000_003 + t * 7919 + 17)
    n = len(tasks[t].train)
    out = {"steps": 0, "loss_first": None, "loss_last": None, "samples": n}
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order).tolist()
        for s in range(0, n, batch_size):
            batch = features.batch(tasks, [(t, i) for i in perm[s:s + batch_size]], "train")
            loss = method(batch) if loss_fn is None else loss_fn(method, batch, t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            out["loss_first"] = value if out["loss_first"] is None else out["loss_first"]
            out["loss_last"], out["steps"] = value, out["steps"] + 1
    out["seconds"] = time.perf_counter() - start
    method.end_task(t, tasks[t])
    return out


def continue_run(cc: ContinueConfig, shared=None) -> dict:
    """Run one continue step (see the module docstring); return continue.json's content."""
    from .train import Session

    run = Path(cc.run)
    session = Session.from_run(run, shared)
    state = session.state
    if state.get("status") != "done":
        raise ConfigError(f"{run}/run.json: the run is not finished (status {state.get('status')!r}); "
                          "finish it with kaizen train --resume first")
    tasks = rebuild_tasks(session)
    ids = [x.task_id for x in tasks]
    name = cc.task or cc.new_task
    if cc.task and cc.task not in ids:
        raise ConfigError(f"--task {cc.task!r} is not in {run}'s stream {ids}; use --new-task to add a task")
    if cc.new_task and cc.new_task in ids:
        raise ConfigError(f"--new-task {cc.new_task!r} already exists in {run}; use --task to improve it")
    versions = {i: int(state.get("versions", {}).get(i, 1)) for i in ids}
    version = versions[name] + 1 if cc.task else 1
    out = Path(cc.out) if cc.out else run / "continue" / f"{name}-v{version}"
    if (out / ck.RUN_JSON).exists():
        raise ConfigError(f"{out} already holds a run; choose another --out")
    added, skipped = read_added(cc.add, name)
    train_items, held_items = split_holdout(added, cc.holdout, cc.seed)
    heldout = [s for _, s in held_items]
    probe = Task(f"{name}#heldout", heldout, heldout) if heldout and cc.task else None
    if cc.task:
        answers = tasks[ids.index(name)].answers
        if answers:
            allowed = {normalize_answer(a) for a in answers}
            for _, s in added:
                if normalize_answer(s.answer) not in allowed:
                    raise DataError(f"{s.source}: answer {s.answer!r} is not in task {name!r}'s answer set {answers}")
    session.tasks = tasks  # the Context of restore() shares this list
    method = session.restore(len(tasks) - 1)
    torch.set_num_threads(session.cfg.threads)
    if not getattr(method, "uses_selection", False):
        raise ConfigError(f"{run} was trained with method {method.name!r}, which makes no task packs; "
                          "continue a kaizen (or modalprompt) run")
    epochs = cc.epochs or session.cfg.epochs
    lr = cc.lr or (default_lr(method, session.cfg.lr) if cc.task else session.cfg.lr)
    if cc.task and not cc.parts:
        cc = replace(cc, train=",".join(default_parts(method)))
    replay = 1
    if cc.task:
        t = ids.index(name)
        before = snapshot(method, session.features, tasks, t, probe)
        replay = cc.replay or replay_factor(len(tasks[t].train), len(train_items))
        tasks[t] = with_replay(tasks[t], [s for _, s in train_items], replay)
        groups = reopen(method, t, cc.parts, lr)
    else:
        t = len(tasks)
        if len(added) < 2:
            raise DataError(f"{cc.add}: --new-task needs at least 2 labelled records (one to train on, one "
                            f"held back as its test split), got {len(added)}")
        labels = sorted({normalize_answer(s.answer): s.answer for _, s in added}.values())
        tasks.append(Task(name, [s for _, s in train_items], heldout, answers=labels))
        before = snapshot(method, session.features, tasks[:t], t, None)
        method.begin_task(t, tasks[t])
        groups = method.param_groups(t, lr)
    trained = fit(method, session.features, tasks, t, groups, epochs, session.cfg.batch_size, cc.seed,
                  continue_loss if cc.task else None)
    trained.update(replay=replay, epochs=epochs, lr=lr)
    after = snapshot(method, session.features, tasks, t, probe)
    session.run = out
    return write_out(cc, session, method, tasks, t, version, versions, before, after, trained,
                     {"file": str(Path(cc.add).resolve()), "labelled": len(added), "unlabelled_skipped": skipped,
                      "train": len(train_items), "heldout": len(held_items),
                      "train_ids": [i for i, _ in train_items], "heldout_ids": [i for i, _ in held_items]})


# --------------------------------------------------------------------------- writing OUT


def _summary(snap: dict, name: str) -> dict:
    return {"test": snap["tasks"].get(name, {}).get("acc"), "heldout": snap.get("heldout", {}).get("acc"),
            "selection": snap["tasks"].get(name, {}).get("selection"),
            "others": {k: v["acc"] for k, v in snap["tasks"].items() if k != name}}


def write_out(cc: ContinueConfig, session, method, tasks: list[Task], t: int, version: int, versions: dict,
              before: dict, after: dict, trained: dict, add_info: dict) -> dict:
    """OUT: copied task folders, task t's new pack files, run.json and continue.json."""
    from safetensors.torch import save_file

    run, out, state, name = Path(cc.run), session.run, session.state, tasks[t].task_id
    for i, task in enumerate(tasks):
        if i != t:
            shutil.copytree(ck.task_dir(run, i, task.task_id), ck.task_dir(out, i, task.task_id))
    counts = method.param_counts(t)
    if cc.task:
        counts = {k: v for k, v in counts.items() if k in cc.parts}
    row = {"task_index": t, "task_id": name, "train_seconds": trained["seconds"], "steps": trained["steps"],
           "train_samples": trained["samples"], "loss_first": trained["loss_first"], "loss_last": trained["loss_last"],
           "params": counts, "trainable_params": int(sum(counts.values())),
           "pack_bytes": int(sum(a.nbytes for a in ck.pack_tensors(method.state_for_pack(name)).values())),
           "acc": [after["tasks"][x.task_id]["acc"] for x in tasks], "selection_mean": after["tasks"][name]["selection"],
           "version": version}
    text_emb = session.features.text_embeddings(list(tasks[t].train_instructions)).numpy()
    ck.save_task(out, t, name, method, row, extra={"text_emb": text_emb})
    last = len(tasks) - 1
    if last != t:  # restore(last) of OUT must give the new method: its state lives with the last task
        state_now = {k: v.detach().contiguous().clone() for k, v in method.state_dict().items()}
        save_file(state_now, str(ck.task_dir(out, last, tasks[last].task_id) / "state.safetensors"))
    write_pack_meta(session, method, t, row)
    meta_path = ck.task_dir(out, t, name) / "pack_meta.json"
    meta = json.loads(meta_path.read_text())
    b, a = _summary(before, name), _summary(after, name)
    meta["version"] = version
    meta["parent_version"] = versions.get(name) if cc.task else None
    meta["metrics"].update({"version": version, "accuracy_before": b["test"], "heldout_accuracy_before": b["heldout"],
                            "heldout_accuracy_after": a["heldout"], "added_samples": add_info["train"],
                            "heldout_samples": add_info["heldout"]})
    ck.write_json(meta_path, meta)
    changed = {k: sum(x != y for x, y in zip(before["answers"][k], after["answers"][k]))
               for k in before["answers"] if k != name}
    report = {"kind": "continue" if cc.task else "new_task", "task": name, "version": version,
              "parent_version": versions.get(name) if cc.task else None, "run": str(run.resolve()),
              "out": str(out.resolve()), "added": add_info,
              "train": {**trained, "seed": cc.seed,
                        "trained": list(TRAINABLE if cc.new_task else cc.parts)},
              "before": b, "after": a, "others_changed_answers": changed,
              "others_unchanged": not any(changed.values())}
    new_state = dict(state, config=dict(state["config"], out=str(out)), stream=[x.task_id for x in tasks],
                     versions={**versions, name: version}, status="done",
                     parent={"run": str(run.resolve()), "task": name, "version": report["parent_version"]})
    new_state["continues"] = list(state.get("continues", [])) + [
        {k: report[k] for k in ("kind", "task", "version", "before", "after", "others_unchanged")}]
    if cc.task:
        added = {k: list(v) for k, v in state.get("added", {}).items()}
        added.setdefault(name, []).append({"file": add_info["file"], "ids": add_info["train_ids"]})
        new_state["added"] = added
    else:
        new_state["extra_tasks"] = list(state.get("extra_tasks", [])) + [
            {"task_id": name, "file": add_info["file"], "train_ids": add_info["train_ids"],
             "test_ids": add_info["heldout_ids"], "answers": list(tasks[t].answers)}]
        new_state["rows"] = list(state["rows"]) + [row]
    ck.write_json(out / ck.RUN_JSON, new_state)
    ck.write_json(out / "continue.json", report)
    return report


def cli_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="kaizen train --continue", description=__doc__.splitlines()[0])
    ap.add_argument("--continue", dest="run", required=True, metavar="RUN", help="a finished training run folder")
    ap.add_argument("--task", default="", help="the task whose next pack version to train")
    ap.add_argument("--new-task", default="", help="name of a new task to start from the added samples")
    ap.add_argument("--add", required=True, metavar="DATA.json", help="labelled LLaVA JSON (kaizen hub samples export)")
    ap.add_argument("--out", default="", help="output run folder (default RUN/continue/TASK-vN)")
    ap.add_argument("--holdout", type=float, default=0.25, help="share of the added samples held back for evaluation")
    ap.add_argument("--epochs", type=int, default=0, help="epochs (default: the run's)")
    ap.add_argument("--lr", type=float, default=0.0, help="learning rate (default: the run's; a third of it "
                    "for --task of a run with image-conditioned prompts, see default_lr)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replay", type=int, default=0, help="times the task's old train data is repeated per epoch "
                    "(default 0 = auto: the old parts weigh at least as much as the added ones)")
    ap.add_argument("--train", default=ContinueConfig.train, help="which of the task's parameters train: comma list "
                    "of prompt, lora, key (a trained key may change which packs other tasks' parts select); "
                    "default: lora, plus prompt when the run's top_k is 1")
    a = ap.parse_args(argv)
    r = continue_run(ContinueConfig(run=a.run, add=a.add, task=a.task, new_task=a.new_task, out=a.out,
                                    holdout=a.holdout, epochs=a.epochs, lr=a.lr, seed=a.seed, train=a.train,
                                    replay=a.replay))

    def pct(x):
        return "-" if x is None else f"{x:.1f}"
    print(f"{r['task']} v{r['version']}: test {pct(r['before']['test'])} -> {pct(r['after']['test'])}, held-back added "
          f"{pct(r['before']['heldout'])} -> {pct(r['after']['heldout'])} ({r['added']['heldout']} samples), other tasks "
          f"{'unchanged' if r['others_unchanged'] else 'CHANGED: ' + str(r['others_changed_answers'])}  -> {r['out']}")
    return 0
