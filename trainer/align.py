"""LLaVA stage 1 for an assembled real base (`kaizen base pretrain` on a `kaizen base assemble` folder).

    kaizen base pretrain bases/real-fast [--steps 600] [--batch 32]

The vision tower (DINOv2) stays frozen, so its patch features are computed ONCE per generic
training image and cached; each step then runs only the projector and the language model. Trained:
the projector alone (real LM, e.g. SmolLM2: LLaVA's stage 1), or the projector and the LM when the
preset says `train_lm` (the fast base's tiny LM starts from random weights and must learn the
generic answers' language), its output head left as assembled when the preset says `fixed_head`
(a fixed random projection, so answer words stage 1 never produced stay learnable by packs).
Data: the generic synthetic instructions (never the task streams).
Writes the weights back, pretrain.json (loss curve, held-out accuracy before/after) and pretrain.png.
Also fits the base's query whitening on the same generic images' pooled tower outputs
(export/query_whitening.py; `--whiten-only` does just that for a base aligned before it existed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from kaizen.export import query_whitening
from kaizen.export.reference import tower_features
from kaizen.runtime.preprocess import preprocess_batch

from .progress import progress


@torch.no_grad()
def tower_rows(base, samples, chunk: int = 32) -> tuple[torch.Tensor, np.ndarray]:
    """Frozen vision-tower features the projector takes [n, N, d_vision] (fp16 to save memory),
    and the tower's pooled outputs [n, d_vision] (raw: what the query whitening is fitted on)."""
    out, pooled = [], []
    for i in progress(range(0, len(samples), chunk), desc="vision features"):
        px = torch.from_numpy(preprocess_batch([s.load_image() for s in samples[i:i + chunk]], base.preprocess))
        rows, pool = tower_features(base.model, px)
        out.append(rows.half())
        pooled.append(pool.float().numpy())
    return torch.cat(out), np.concatenate(pooled)


def fit_query_whitening(base, base_dir: Path, pooled: np.ndarray, log=print) -> dict:
    """Fit the base's query whitening on generic pooled queries, save it, record it in
    kaizen_base.json and make `base` use it (export/query_whitening.py)."""
    mean, matrix = query_whitening.fit(pooled)
    query_whitening.save(base_dir, mean, matrix)
    query_whitening.attach(base.model, mean, matrix)
    info_path = base_dir / "kaizen_base.json"
    info = json.loads(info_path.read_text())
    entry = {"file": query_whitening.FILE, "eps": query_whitening.EPS, "images": len(pooled),
             "data": "generic instruction images (trainer/data/generic.py)"}
    info.setdefault("query", {})["whitening"] = entry
    info_path.write_text(json.dumps(info, indent=2))
    base.info = info
    log(f"query whitening fitted on {len(pooled)} generic images -> {base_dir / query_whitening.FILE}")
    return entry


def whiten(base_dir, n_images: int = 1024, seed: int = 0, log=print) -> dict:
    """`kaizen base pretrain BASE --whiten-only`: fit the query whitening of an aligned base."""
    from .bases import load_base
    from .data.generic import generic_instruction_samples

    base_dir = Path(base_dir)
    base = load_base(base_dir)
    _, pooled = tower_rows(base, generic_instruction_samples(seed=seed, n=n_images))
    return fit_query_whitening(base, base_dir, pooled, log)


def _loss(base, samples, rows: torch.Tensor) -> torch.Tensor:
    from .pretrain import vlm_loss

    return vlm_loss(base, samples, feats=base.model.model.multi_modal_projector(rows.float()))


@torch.no_grad()
def heldout_accuracy(base, samples, rows: torch.Tensor, batch: int = 64) -> float:
    """Greedy exact-match accuracy (%) on held-out generic questions, image rows from cached features."""
    from kaizen.export.reference import left_pad, request_rows, torch_generate

    from .data.types import normalize_answer

    hits = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        feats = base.model.model.multi_modal_projector(rows[i:i + batch].float())
        emb, mask = left_pad(request_rows(base.model, base, feats, [s.instruction for s in chunk]))
        for s, toks in zip(chunk, torch_generate(base.model, base, emb, mask, max_new_tokens=6)):
            text = base.tokenizer.decode([t for t in toks if t != base.spec.eos_token_id], skip_special_tokens=True)
            hits += normalize_answer(text) == normalize_answer(s.answer)
    return 100.0 * hits / max(len(samples), 1)


def align(base_dir, steps: int = 600, batch: int = 32, seed: int = 0, n_images: int | None = None,
          lr: float = 2e-3, log=print) -> dict:
    from .bases import load_base
    from .data.generic import generic_instruction_samples
    from .pretrain import _cosine_lr, write_pretrain_report

    base_dir = Path(base_dir)
    base = load_base(base_dir)
    preset = base.info.get("preset", {})
    train_lm, fixed_head = bool(preset.get("train_lm")), bool(preset.get("fixed_head"))
    t0 = time.perf_counter()
    n_images = n_images or min(1024, max(batch, steps * batch // 2))  # ~2 epochs; the tower pass dominates
    train = generic_instruction_samples(seed=seed, n=n_images)
    held = generic_instruction_samples(seed=seed + 1000, n=min(128, n_images))
    (rows, pooled), (held_rows, _) = tower_rows(base, train), tower_rows(base, held)
    whitening = fit_query_whitening(base, base_dir, pooled, log)
    before = heldout_accuracy(base, held, held_rows)
    model = base.model
    model.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    if train_lm:
        params += list(model.model.language_model.parameters())
        params += [] if fixed_head else list(model.lm_head.parameters())  # a fixed head stays as assembled
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    losses = []
    model.train()
    for step in progress(range(steps), desc="align projector" + (" + LM" if train_lm else "")):
        _cosine_lr(opt, step, steps, lr)
        idx = rng.choice(len(train), batch, replace=False)
        loss = _loss(base, [train[j] for j in idx], rows[torch.from_numpy(idx)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.requires_grad_(False)
    after = heldout_accuracy(base, held, held_rows)
    report = {"recipe": "llava-stage-1" + (" + tiny LM" if train_lm else ""), "steps": steps, "batch": batch,
              "seed": seed, "lr": lr, "n_images": n_images, "fixed_head": fixed_head,
              "seconds": round(time.perf_counter() - t0, 1),
              "trainable_parameters": sum(p.numel() for p in params),
              "vlm_heldout_accuracy": {"before": before, "after": after}, "vlm_loss": losses, "clip_loss": [],
              "query_whitening": whitening}
    model.save_pretrained(str(base_dir))
    write_pretrain_report(base_dir, report)
    log(f"aligned in {report['seconds']}s ({report['trainable_parameters']} trainable parameters): "
        f"generic held-out accuracy {before:.1f}% -> {after:.1f}%")
    return report
