"""The demo's improvement loop: a drifted part reaches the line, the stations capture it, the
trainer makes the task's next pack version from it, and the stations answer it better.

1. before: the original test parts of every task and held-back drifted parts (a new supplier's
   blue silicone seals, trainer/data/drift.py) go to the stations: v1 answers the drift poorly;
2. the line: drifted parts arrive; the stations capture the unsure ones, and an operator corrects
   every wrong answer with a `feedback` message (InferenceClient.feedback, by part_id);
3. the stations upload what they captured over the fleet link; `kaizen hub samples export`
   writes it as LLaVA JSON, the parts nobody labelled are labelled (here from the generator's
   ground truth, as a labelling team would) and come back with `kaizen hub samples import`;
4. `kaizen train --continue RUN --task T --add labelled.json` trains the next version of T's pack
   (T's prompt and LoRA only), which is exported, signed, published and activated as usual;
5. after: the same parts again. Other tasks' packs did not change; their answers are compared
   part by part. The report gives before/after and the time from the first captured part to v2
   active on every station.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

from PIL import Image

from ..data.types import normalize_answer
from ..progress import progress

TASK, DRIFT = "seal_defect", "supplier"


def _png(sample) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(sample.load_image()).save(buf, format="PNG")
    return buf.getvalue()


def ask(fleet, parts: list[tuple[str, object]], desc: str) -> list[dict]:
    """Send (group, sample) parts to the stations, part k always to station k % n."""
    clients = [fleet.client(i) for i in range(fleet.n)]
    rows = []
    try:
        for k, (group, s) in enumerate(progress(parts, desc=desc)):
            r = clients[k % fleet.n].infer(_png(s), s.instruction)
            rows.append({"group": group, "answer": r["answer"], "task_id": r["task_id"], "gold": s.answer,
                         "correct": normalize_answer(r["answer"] or "") == normalize_answer(s.answer)})
    finally:
        for c in clients:
            c.close()
    return rows


def accuracy(rows: list[dict], group: str) -> float:
    mine = [r for r in rows if r["group"] == group]
    return 100.0 * sum(r["correct"] for r in mine) / len(mine)


def line_with_operator(fleet, samples) -> dict:
    """The new supplier's first lot on the line: the operator checks every part and sends its
    right answer as `feedback` (by part_id): a correction where the station was wrong, a
    confirmation where it was right. (Corrections alone would teach only the answers v1 gets
    wrong: measured, all 106 corrections of the first demo run were "yes", and v2 got worse.)"""
    clients = [fleet.client(i) for i in range(fleet.n)]
    out = {"parts": len(samples), "wrong": 0, "labelled": 0, "first_capture_at": None, "truth": {}}
    try:
        for k, s in enumerate(progress(samples, desc="drifted parts on the line")):
            c = clients[k % fleet.n]
            png = _png(s)
            out["truth"][hashlib.sha256(png).hexdigest()] = s.answer   # what a labelling team would know
            r = c.infer(png, s.instruction)
            out["wrong"] += normalize_answer(r["answer"] or "") != normalize_answer(s.answer)
            fb = c.feedback(s.answer, part_id=r["part_id"], task=TASK)   # the operator knows the station's task
            out["labelled"] += int(fb["captured"])
            out["first_capture_at"] = out["first_capture_at"] or time.time()
    finally:
        for c in clients:
            c.close()
    return out


def wait_uploaded(fleet, conf: str, timeout: float = 120.0) -> dict:
    """Until every station's capture queue is empty (nothing in memory, nothing unacked on disk)
    at two polls in a row; -> each station's capture counters."""
    start, empty_before = time.monotonic(), False
    while True:
        stats = {}
        for i in range(fleet.n):
            with fleet.client(i, timeout_ms=10000) as c:
                stats[i] = c.status()["station"]["capture"]
        empty = all(s["pending"] == 0 and s["queued"] == 0 for s in stats.values())
        if empty and empty_before:
            return stats
        empty_before = empty
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"captured parts not uploaded within {timeout:.0f} s: {stats}")
        time.sleep(0.5)


def label_from_truth(export_dir: Path, truth: dict[str, str]) -> dict[str, int]:
    """Fill the empty answers of an exported data.json from the generator's ground truth, by the
    sha256 of the image bytes the station captured. Only the line's parts are labelled: parts the
    stations captured while being measured (the test sets) stay unlabelled, so they never reach
    training. -> {"labelled", "left_unlabelled"}"""
    data_path = export_dir / "data.json"
    records = json.loads(data_path.read_text())
    out = {"labelled": 0, "left_unlabelled": 0}
    for rec in records:
        gpt = rec["conversations"][1]
        if gpt["value"]:
            continue
        answer = truth.get(hashlib.sha256((export_dir / rec["image"]).read_bytes()).hexdigest())
        if answer is None:
            out["left_unlabelled"] += 1
        else:
            gpt["value"] = answer
            out["labelled"] += 1
    data_path.write_text(json.dumps(records, indent=1))
    return out


def next_version(packs_dir: Path, task: str) -> int:
    """One above every version of `task` the demo ever made (the plant operations made v2)."""
    seen = [int(p.stem.rsplit("-", 1)[1]) for p in packs_dir.glob(f"{task}-*.kpk")]
    return max(seen, default=0) + 1


def improvement_loop(fleet, delivery, run: Path, tasks, shared, log, *, seed: int = 0,
                     n_line: int = 160, n_test: int = 40) -> dict:
    """The whole loop on the live demo fleet (see the module docstring); cached in WORK/improve.json."""
    from kaizen.export.pack_export import export_pack
    from kaizen.hub.cli import cli_samples

    from .. import checkpoint as ck
    from ..continue_run import ContinueConfig, continue_run
    from ..data.drift import drifted_task
    from ..data.synthetic import make_task

    done = delivery.work / "improve.json"
    if done.exists():
        log("reusing the improvement loop of the first run")
        return json.loads(done.read_text())
    conf = str(fleet.work / "hub.toml")
    drift = drifted_task(TASK, DRIFT, seed=seed + 100, n_train=n_line, n_test=5 * n_test)   # 40 parts: +-7 points
    more = make_task(TASK, seed + 200, n_train=1, n_test=5 * n_test).test   # the original parts, 5x more
    parts = [(t.task_id, s) for t in tasks for s in t.test] + [("drifted", s) for s in drift.test] + \
        [("original_more", s) for s in more]
    before = ask(fleet, parts, "before: test + drifted parts")
    log(f"v1 on drifted {TASK} ({DRIFT}): {accuracy(before, 'drifted'):.1f} %, original {accuracy(before, TASK):.1f} %")
    t0 = time.time()
    line = line_with_operator(fleet, drift.train)
    stats = wait_uploaded(fleet, conf)
    uploaded_at = time.time()
    if not line["labelled"]:
        log("improvement loop: no part was captured (is [capture] off?); nothing to learn")
        return {"task": TASK, "drift": DRIFT, "line": line, "skipped": "no part was captured at the stations"}
    work = delivery.work / "improve"
    assert cli_samples(["export", "--task", TASK, "--out", str(work / "export"), "--config", conf]) == 0
    labelled_by_team = label_from_truth(work / "export", line.pop("truth"))
    assert cli_samples(["import", str(work / "export" / "data.json"), "--config", conf]) == 0
    assert cli_samples(["export", "--task", TASK, "--labelled-only", "--out", str(work / "labelled"),
                        "--config", conf]) == 0
    version = next_version(delivery.work / "packs", TASK)
    out = work / f"{TASK}-v{version}"
    t1 = time.perf_counter()
    cont = continue_run(ContinueConfig(run=str(run), task=TASK, add=str(work / "labelled" / "data.json"),
                                       out=str(out), seed=seed), shared=shared)
    train_s = time.perf_counter() - t1
    t_index = [t.task_id for t in tasks].index(TASK)
    pack = delivery.work / "packs" / f"{TASK}-{version}.kpk"
    export_pack(ck.task_dir(out, t_index, TASK), pack, bundle=delivery.bundle, signing_key=delivery.key,
                version=version, engine=delivery.engine)
    took = fleet.wait_activated(fleet.publish(pack))
    active_at = time.time()
    after = ask(fleet, parts, "after: test + drifted parts")
    others = [(b, a) for b, a in zip(before, after) if b["group"] not in (TASK, "drifted", "original_more")]
    result = {
        "task": TASK, "drift": DRIFT, "version": version, "line": line,
        "captured": {str(i): s for i, s in stats.items()}, "labelled_by_team": labelled_by_team,
        "train": {"added": {k: v for k, v in cont["added"].items() if not k.endswith("_ids")},
                  "seconds": round(train_s, 1)},
        "drifted": {"v1": accuracy(before, "drifted"), "v2": accuracy(after, "drifted")},
        "original": {"v1": accuracy(before, TASK), "v2": accuracy(after, TASK)},
        "original_more": {"parts": len(more), "v1": accuracy(before, "original_more"),
                          "v2": accuracy(after, "original_more")},
        "others": {"parts": len(others), "answers_changed": sum(b["answer"] != a["answer"] for b, a in others),
                   "selection_changed": sum(b["task_id"] != a["task_id"] for b, a in others)},
        "timeline_s": {"line_to_uploaded": round(uploaded_at - t0, 1),
                       "first_capture_to_v2_active": round(active_at - (line["first_capture_at"] or t0), 1),
                       "activation_per_station": {s: round(v, 2) for s, v in took.items()}},
        "pack_bytes": pack.stat().st_size,
    }
    log(f"improvement loop: {TASK} v{version} from {line['labelled']} parts the operator labelled ({line['wrong']} "
        "corrections): "
        f"drifted {result['drifted']['v1']:.1f} -> {result['drifted']['v2']:.1f} %, original "
        f"{result['original']['v1']:.1f} -> {result['original']['v2']:.1f} %, other tasks' answers changed "
        f"{result['others']['answers_changed']} of {result['others']['parts']}; first capture -> v{version} active "
        f"{result['timeline_s']['first_capture_to_v2_active']} s")
    done.write_text(json.dumps(result, indent=2))
    return result


def improve_lines(r: dict | None) -> list[str]:
    """The report's "Improvement loop" section."""
    if not r:
        return []
    if r.get("skipped"):
        return ["## Improvement loop", "", f"Skipped: {r['skipped']}.", ""]
    cap = r["captured"]
    n_cap = sum(s.get("captured", 0) for s in cap.values())
    o = r["others"]
    return ["## Improvement loop", "",
            f"A new supplier's parts (`{r['task']}`, drift `{r['drift']}`) reach the line. "
            f"{r['line']['parts']} of them pass the stations; the operator sends every part's right answer as `feedback` "
            f"({r['line']['wrong']} corrections, the rest confirmations), the stations capture {n_cap} parts in all "
            "(the feedback plus unsure parts) and upload them to the hub; "
            f"{r['labelled_by_team']['labelled']} unlabelled line parts are labelled after `kaizen hub samples export` and "
            f"imported ({r['labelled_by_team']['left_unlabelled']} captured test parts stay unlabelled, out of training); "
            f"`kaizen train --continue` makes v{r['version']} of the pack ({r['train']['seconds']} s), which "
            "is published and activated like any pack.", "",
            f"| parts at the stations | v1 % | v{r['version']} % |", "|---|---|---|",
            f"| drifted (held back: never labelled, never trained on) | {r['drifted']['v1']:.1f} | {r['drifted']['v2']:.1f} |",
            f"| original `{r['task']}` test set | {r['original']['v1']:.1f} | {r['original']['v2']:.1f} |",
            f"| {r['original_more']['parts']} more original `{r['task']}` parts | {r['original_more']['v1']:.1f} | "
            f"{r['original_more']['v2']:.1f} |", "",
            f"Other tasks: {o['answers_changed']} of {o['parts']} answers changed, {o['selection_changed']} "
            "selections changed (their packs are the same files).",
            f"First captured part to v{r['version']} active on every station: "
            f"**{r['timeline_s']['first_capture_to_v2_active']} s** on this machine.", ""]
