"""Frozen-feature cache: the base's vision rows and the selection queries, computed once per sample.

The VLM base and the query encoders are frozen, so a training step only needs to run the language
model on inputs_embeds. Per task split we keep, stacked in memory:

    image     f32 [n, N, d_model]   vision tower + projector rows (export.reference.image_features)
    clip_img  f32 [n, d_img]        image query, L2-normalised: the CLIP image embedding (aligned
                                    CLIP), or the base's own pooled vision output (unaligned)
    clip_txt  f32 [n, d_txt]        text query of the instruction, L2-normalised: CLIP text tower,
                                    or the sentence encoder (unaligned)

    cache = FeatureCache(base, clip)
    batch = cache.batch(tasks, [(task_index, sample_index), ...], split="train")

Splits are keyed by the Task object (tasks live for the whole run), instruction embeddings by
their text. Nothing is written to disk: on the tiny bases a 6-task stream caches in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kaizen.export.reference import image_features, vision_pass
from kaizen.runtime.preprocess import preprocess_batch
from kaizen.runtime.prompting import clip_text_ids

from .progress import progress


@dataclass
class SplitFeatures:
    """Cached features of one task split (train or test), row i = sample i."""

    image: torch.Tensor
    clip_img: torch.Tensor
    clip_txt: torch.Tensor
    instructions: list[str]
    answers: list[str]


@dataclass
class Batch:
    """What a method sees: cached features of a few samples plus their text and true task."""

    image: torch.Tensor  # [B, N, d_model]
    clip_img: torch.Tensor  # [B, d_clip], unit norm
    clip_txt: torch.Tensor  # [B, d_clip], unit norm
    instructions: list[str]
    answers: list[str]
    task_index: torch.Tensor  # [B] long: index of the true task in the stream
    refs: list[tuple[int, int]] = field(default_factory=list)  # (task index, sample index)

    def __len__(self) -> int:
        return len(self.instructions)

    def subset(self, idx: list[int]) -> Batch:
        ix = torch.as_tensor(idx, dtype=torch.long)
        return Batch(self.image[ix], self.clip_img[ix], self.clip_txt[ix],
                     [self.instructions[i] for i in idx], [self.answers[i] for i in idx],
                     self.task_index[ix], [self.refs[i] for i in idx] if self.refs else [])

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        parts = [p for p in parts if len(p)]
        return Batch(torch.cat([p.image for p in parts]), torch.cat([p.clip_img for p in parts]),
                     torch.cat([p.clip_txt for p in parts]), [x for p in parts for x in p.instructions],
                     [x for p in parts for x in p.answers], torch.cat([p.task_index for p in parts]),
                     [x for p in parts for x in p.refs])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


class FeatureCache:
    """Computes and keeps the frozen features of task splits (see the module docstring)."""

    def __init__(self, base, clip, chunk: int = 64):
        """`clip`: the query encoders, an aligned `Clip` or an unaligned `TextQuery` (export.loading)."""
        self.base, self.clip, self.chunk = base, clip, chunk
        self.aligned = bool(getattr(clip, "aligned", True))
        if self.aligned:
            d = int(clip.model.config.projection_dim)
            self.query_dims = (d, d)
        else:
            self.query_dims = (int(base.model.config.vision_config.hidden_size), int(clip.dim))
        self._splits: dict[tuple[int, str], tuple[object, SplitFeatures]] = {}
        self._text: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Normalised text queries [len(texts), d_txt] (cached per distinct text)."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._text]
        c = self.clip
        for i in range(0, len(todo), self.chunk):
            part = todo[i:i + self.chunk]
            if self.aligned:
                cfg = c.model.config.text_config  # the same ids base_export writes into base.json
                ids, mask = clip_text_ids(c.tokenizer, part, c.max_len, cfg.bos_token_id, cfg.eos_token_id,
                                          cfg.pad_token_id or 0)
                emb = _pooled(c.model.get_text_features(input_ids=torch.from_numpy(ids),
                                                        attention_mask=torch.from_numpy(mask)))
            else:
                emb = c.encode(part)
            for text, row in zip(part, _unit(emb)):
                self._text[text] = row
        return torch.stack([self._text[t] for t in texts])

    @torch.no_grad()
    def _images(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        rows, queries = [], []
        for i in range(0, len(samples), self.chunk):
            pixels = [s.load_image() for s in samples[i:i + self.chunk]]
            px = torch.from_numpy(preprocess_batch(pixels, self.base.preprocess))
            if not self.aligned:  # one vision pass gives the image rows and the image query
                feats, query = vision_pass(self.base.model, px)
                rows.append(feats.float())
                queries.append(_unit(query.float()))
                continue
            rows.append(image_features(self.base.model, px).float())
            cpx = torch.from_numpy(preprocess_batch(pixels, self.clip.preprocess))
            queries.append(_unit(_pooled(self.clip.model.get_image_features(pixel_values=cpx))))
        return torch.cat(rows), torch.cat(queries)

    def split(self, task, name: str) -> SplitFeatures:
        """Features of `task.train` or `task.test` (computed on first use)."""
        key = (id(task), name)
        if key not in self._splits:
            samples = getattr(task, name)
            image, clip_img = self._images(samples)
            feats = SplitFeatures(image, clip_img, self.text_embeddings([s.instruction for s in samples]),
                                  [s.instruction for s in samples], [s.answer for s in samples])
            self._splits[key] = (task, feats)  # keep the task alive so id() stays unique
        return self._splits[key][1]

    def warm(self, tasks, splits=("train", "test")) -> None:
        for task in progress(tasks, desc="features"):
            for name in splits:
                self.split(task, name)

    def batch(self, tasks, refs: list[tuple[int, int]], split: str = "train") -> Batch:
        """A Batch of the samples `refs` = [(task index in `tasks`, sample index)], in that order."""
        image, ci, ct, ins, ans = [], [], [], [], []
        for t, i in refs:
            f = self.split(tasks[t], split)
            image.append(f.image[i])
            ci.append(f.clip_img[i])
            ct.append(f.clip_txt[i])
            ins.append(f.instructions[i])
            ans.append(f.answers[i])
        return Batch(torch.stack(image), torch.stack(ci), torch.stack(ct), ins, ans,
                     torch.as_tensor([t for t, _ in refs], dtype=torch.long), list(refs))
