"""Pretrain a built-in tiny base (and its tiny CLIP) briefly on generic synthetic data, then
freeze it: the demo's base is a base in the real sense, not random weights.

    kaizen base pretrain bases/tiny-llama [--steps 600] [--clip-steps 600]

CLIP first: symmetric InfoNCE on generic image-caption pairs. Then, as in LLaVA, the VLM's
vision tower starts from that CLIP's vision tower (same shape in the built-in presets) and the
VLM learns next-token CE on answers of generic image questions (shapes, colours, counts, marks,
arrows), the vision tower at a tenth of the learning rate. Never the task stream's test phrasings. Writes the weights back, plus pretrain.json (loss curves,
held-out accuracy) and pretrain.png into the base folder.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kaizen.runtime.preprocess import preprocess_batch
from kaizen.runtime.prompting import answer_ids, clip_text_ids, prompt_ids

from .bases import load_base, load_clip
from .progress import progress


def vlm_batch(base, samples, device="cpu", feats=None):
    """Right-padded (inputs_embeds, attention_mask, labels) with image rows from the vision tower
    (or `feats` [B, N, d_model], image rows computed elsewhere, e.g. from cached tower outputs)."""
    model = base.model
    if feats is None:
        px = torch.from_numpy(preprocess_batch([s.load_image() for s in samples], base.preprocess)).to(device)
        feats = model.model.get_image_features(pixel_values=px).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    table = model.get_input_embeddings()
    seqs, labels = [], []
    for s in samples:
        p = prompt_ids(base.tokenizer, base.spec, s.instruction)
        a = answer_ids(base.tokenizer, base.spec, s.answer)
        seqs.append(np.concatenate([p, a]))
        labels.append(np.concatenate([np.full(len(p), -100), a]))
    length = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), length), base.spec.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), length), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for b, (x, y) in enumerate(zip(seqs, labels)):
        ids[b, : len(x)] = torch.from_numpy(x)
        lab[b, : len(y)] = torch.from_numpy(y)
        mask[b, : len(x)] = 1
    emb = table(ids)
    img = (ids == base.spec.image_token_id).unsqueeze(-1)
    emb = emb.masked_scatter(img, feats.to(emb.dtype).reshape(-1, emb.shape[-1]))
    return emb, mask, lab


def vlm_loss(base, samples, feats=None) -> torch.Tensor:
    """Answer CE of the VLM; `feats`: precomputed image rows (else the vision tower runs)."""
    emb, mask, lab = vlm_batch(base, samples, feats=feats)
    logits = base.model(inputs_embeds=emb, attention_mask=mask).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)


def clip_loss(clip, images, captions) -> torch.Tensor:
    cfg = clip.model.config.text_config
    px = torch.from_numpy(preprocess_batch(images, clip.preprocess))
    ids, m = clip_text_ids(clip.tokenizer, captions, clip.max_len, cfg.bos_token_id, cfg.eos_token_id,
                           cfg.pad_token_id or 0)
    out = clip.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(m), pixel_values=px)
    target = torch.arange(len(images))
    return (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2


def _cosine_lr(opt, step, total, peak):
    lr = peak * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def init_vision_from_clip(base, clip) -> bool:
    """LLaVA's recipe: the VLM's vision tower starts as the (pretrained) CLIP's vision tower.
    Done when the shapes match (the built-in presets); returns whether it was done."""
    tower = base.model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    src = clip.model.vision_model.state_dict()
    dst = tower.state_dict()
    if set(src) != set(dst) or any(src[k].shape != dst[k].shape for k in src):
        return False
    tower.load_state_dict(src)
    return True


def train_loop(model, loss_fn, batches, steps: int, lr: float, desc: str, groups=None) -> list[float]:
    model.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(groups or model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in progress(range(steps), desc=desc):
        _cosine_lr(opt, step, steps, lr)
        loss = loss_fn(*batches(step))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    model.requires_grad_(False)
    return losses


@torch.no_grad()
def heldout_vlm_accuracy(base, samples, batch: int = 64) -> float:
    from kaizen.export.reference import embed_prompt, torch_generate
    from kaizen.trainer.data.types import normalize_answer

    hits = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i: i + batch]
        px = torch.from_numpy(preprocess_batch([s.load_image() for s in chunk], base.preprocess))
        emb, mask = embed_prompt(base.model, base, px, [s.instruction for s in chunk])
        for s, toks in zip(chunk, torch_generate(base.model, base, emb, mask, max_new_tokens=6)):
            text = base.tokenizer.decode([t for t in toks if t != base.spec.eos_token_id])
            hits += normalize_answer(text) == normalize_answer(s.answer)
    return 100.0 * hits / len(samples)


@torch.no_grad()
def heldout_clip_accuracy(clip, pairs, batch: int = 32) -> float:
    """Image -> caption top-1 retrieval accuracy within batches of `batch` (chance = 1/batch)."""
    cfg = clip.model.config.text_config
    hits = total = 0
    for i in range(0, len(pairs) - batch + 1, batch):
        imgs, caps = zip(*pairs[i: i + batch])
        px = torch.from_numpy(preprocess_batch(list(imgs), clip.preprocess))
        ids, m = clip_text_ids(clip.tokenizer, list(caps), clip.max_len, cfg.bos_token_id, cfg.eos_token_id,
                               cfg.pad_token_id or 0)
        out = clip.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(m), pixel_values=px)
        hits += int((out.logits_per_image.argmax(1) == torch.arange(len(imgs))).sum())
        total += len(imgs)
    return 100.0 * hits / max(total, 1)


def pretrain(base_dir, steps: int = 600, clip_steps: int = 600, batch: int = 32, seed: int = 0,
             lr: float = 3e-3, log=print) -> dict:
    from .data.generic import generic_caption_pairs, generic_instruction_samples

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    base_dir = Path(base_dir)
    info = json.loads((base_dir / "kaizen_base.json").read_text())
    if (info.get("query") or {}).get("kind") == "vision+text":  # an assembled real base: LLaVA stage 1
        from .align import align

        return align(base_dir, steps=steps, batch=batch, seed=seed, log=log)
    base, clip = load_base(base_dir), load_clip(base_dir / "clip")
    n = min(4000, max(256, steps * batch))  # rendering costs ~6 ms an image: no more than the steps use
    train = generic_instruction_samples(seed=seed, n=n)
    held = generic_instruction_samples(seed=seed + 1000, n=256)
    pairs = generic_caption_pairs(seed=seed, n=min(4000, max(256, clip_steps * 64)))
    held_pairs = generic_caption_pairs(seed=seed + 1000, n=256)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    clip_before = heldout_clip_accuracy(clip, held_pairs)
    clip_losses = train_loop(clip.model, lambda im, cap: clip_loss(clip, im, cap),
                             lambda _: list(zip(*[pairs[j] for j in rng.choice(len(pairs), 64, replace=False)])),
                             clip_steps, lr, "pretrain clip")
    clip_after = heldout_clip_accuracy(clip, held_pairs)
    copied = init_vision_from_clip(base, clip)
    before = heldout_vlm_accuracy(base, held)
    vision = [p for n, p in base.model.named_parameters() if "vision_tower" in n]
    rest = [p for n, p in base.model.named_parameters() if "vision_tower" not in n]
    groups = [{"params": vision, "lr_mult": 0.1 if copied else 1.0}, {"params": rest}]
    vlm_losses = train_loop(base.model, lambda s: vlm_loss(base, s),
                            lambda _: ([train[j] for j in rng.choice(len(train), batch, replace=False)],),
                            steps, lr, "pretrain base", groups=groups)
    after = heldout_vlm_accuracy(base, held)
    report = {"steps": steps, "clip_steps": clip_steps, "batch": batch, "seed": seed, "lr": lr,
              "vision_tower_from_clip": copied,
              "seconds": round(time.perf_counter() - t0, 1),
              "vlm_heldout_accuracy": {"before": before, "after": after},
              "clip_heldout_retrieval_top1_of_32": {"before": clip_before, "after": clip_after},
              "vlm_loss": vlm_losses, "clip_loss": clip_losses}
    base.model.save_pretrained(str(base_dir))
    clip.model.save_pretrained(str(base_dir / "clip"))
    write_pretrain_report(base_dir, report)
    log(f"pretrained in {report['seconds']}s: VLM held-out accuracy {before:.1f}% -> {after:.1f}%, "
        f"CLIP retrieval top-1/32 {clip_before:.1f}% -> {clip_after:.1f}%")
    return report


def write_pretrain_report(base_dir: Path, report: dict) -> None:
    """Mark the base pretrained in kaizen_base.json (the report minus its loss curves), and write
    pretrain.json and pretrain.png next to the weights."""
    info = json.loads((base_dir / "kaizen_base.json").read_text())
    info["pretrained"] = {k: v for k, v in report.items() if not k.endswith("_loss")}
    (base_dir / "kaizen_base.json").write_text(json.dumps(info, indent=2))
    (base_dir / "pretrain.json").write_text(json.dumps(report, indent=2))
    _plot(report, base_dir / "pretrain.png")


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "vlm_loss", "base (VLM) answer CE"), (axes[1], "clip_loss", "CLIP InfoNCE")):
        y = np.asarray(report[key])
        if not len(y):  # e.g. no CLIP stage for a base with unaligned query encoders
            ax.set_visible(False)
            continue
        ax.plot(y, alpha=0.3, color="C0")
        k = max(1, len(y) // 30)
        ax.plot(np.convolve(y, np.ones(k) / k, mode="valid"), color="C0")
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen base pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("base", help="base folder made by `kaizen base init` (weights are replaced in place)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--clip-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whiten-only", action="store_true",
                    help="an assembled real base: only fit its query whitening (export/query_whitening.py) "
                         "on the generic images, weights untouched (its fingerprint changes: re-export packs)")
    a = ap.parse_args(argv)
    if a.whiten_only:
        from .align import whiten

        whiten(a.base, seed=a.seed)
        return 0
    pretrain(a.base, a.steps, a.clip_steps, a.batch, a.seed, a.lr)
    return 0
