"""What a task pack needs besides its arrays, written next to each finished task of a run:

    RUN/tasks/<i>_<task>/pack_meta.json   task_id, method, instructions, answers, metrics, base fingerprint
    RUN/tasks/<i>_<task>/golden/<k>.png   a few test images for the station's post-install probe

The golden answers are what THIS pack alone answers in torch (its own prompt and LoRA, the
same decoding rule as the Station's probe), so the probe checks that the station reproduces
the trainer on its own hardware, not that the model is perfect.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from . import checkpoint as ck
from .methods import lm
from .methods.lora import activated

GOLDEN = 4


def selectable(method) -> bool:
    return bool(getattr(method, "uses_selection", False))


@torch.no_grad()
def pack_alone_answers(method, session, t: int, refs) -> list[str]:
    """Answers of task t's pack on `refs` with only its prompt (image-conditioned when the method
    has prompt nets) and LoRA (the Station's probe)."""
    batch = session.features.batch(session.tasks, refs, "test")
    prompts = list(method.prompt_for(t, batch.clip_img))
    answers = session.tasks[t].answers
    with activated(method.slots, method.adapters_for(t) if method.per_task_lora else None):
        if answers:
            picks = lm.score_candidates(method.ctx.base, batch.image, batch.instructions, prompts,
                                        [list(answers)] * len(refs))
            return [answers[p] for p in picks]
        return lm.greedy(method.ctx.base, batch.image, batch.instructions, prompts, method.cfg.max_new_tokens)


FLOOR_QUANTILE = 0.01


@torch.no_grad()
def selection_floor(method, session, t: int) -> float:
    """Calibrated no-match floor of task t: the 1 % quantile of its own training parts' selection
    scores against its final key. A station (calibrated_threshold) answers "no task matches" when
    a part's best score is below the best pack's floor: parts unlike anything the task was trained on."""
    from .methods.modalprompt import torch_scores

    f = session.features.split(session.tasks[t], "train")
    s = torch_scores(f.clip_img, f.clip_txt, method.keys[t].detach()[None], method.cfg.alpha)[:, 0]
    return round(float(torch.quantile(s, FLOOR_QUANTILE)), 6)


def write_pack_meta(session, method, t: int, row: dict) -> Path | None:
    """Write pack_meta.json + golden/ for task t of a selection method; None for other methods."""
    if not selectable(method):
        return None
    task = session.tasks[t]
    d = ck.task_dir(session.run, t, task.task_id)
    refs = [(t, i) for i in range(min(GOLDEN, len(task.test)))]
    expected = pack_alone_answers(method, session, t, refs)
    (d / "golden").mkdir(parents=True, exist_ok=True)
    golden = []
    for k, ((_, i), answer) in enumerate(zip(refs, expected)):
        buf = io.BytesIO()
        Image.fromarray(task.test[i].load_image()).save(buf, format="PNG")
        (d / "golden" / f"{k}.png").write_bytes(buf.getvalue())
        golden.append({"image": f"golden/{k}.png", "instruction": task.test[i].instruction, "answer": answer})
    metrics = {"accuracy_after_training": row.get("acc", [None] * (t + 1))[t], "train_seconds": row.get("train_seconds"),
               "trainable_params": row.get("trainable_params"), "selection": row.get("selection_mean"),
               "selection_threshold": selection_floor(method, session, t),
               "fusion_top_k": int(method.cfg.top_k)}   # stations fuse this many packs when this one is selected
    meta = {"task_id": task.task_id, "method": method.name, "instructions": list(task.train_instructions),
            "answers": list(task.answers) if task.answers else None, "base_fingerprint": session.shared.fingerprint,
            "metrics": metrics, "golden": golden}
    ck.write_json(d / "pack_meta.json", meta)
    return d
