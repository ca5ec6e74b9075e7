"""Replay baseline: lora_ft plus a small reservoir buffer of earlier training samples.

The buffer (capacity `replay_size` samples over all tasks, reservoir sampling: every training
sample seen so far has the same chance to be in it) is filled at the end of each task. Each
training step appends len(batch) // 2 buffer samples (drawn with a per-task generator) to the
batch. The buffer holds references into the feature cache and is saved in the checkpoint.
"""

from __future__ import annotations

import torch

from .lora_ft import LoraFT


class Replay(LoraFT):
    name = "replay"

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.buffer: list[tuple[int, int]] = []
        self.n_seen = 0
        self._draw = torch.Generator()

    def begin_task(self, task_index: int, task) -> None:
        super().begin_task(task_index, task)
        self._draw = self.generator(task_index, 3)

    def training_step(self, batch) -> torch.Tensor:
        n = min(len(self.buffer), max(1, len(batch) // 2))
        if n:
            pick = torch.randint(0, len(self.buffer), (n,), generator=self._draw).tolist()
            old = self.ctx.features.batch(self.ctx.tasks, [self.buffer[i] for i in pick], "train")
            batch = type(batch).concat([batch, old])
        return super().training_step(batch)

    def end_task(self, task_index: int, task) -> None:
        super().end_task(task_index, task)
        g = self.generator(task_index, 2)
        refs = self.training_refs(task_index)
        for i in torch.randperm(len(refs), generator=g).tolist():
            self.n_seen += 1
            if len(self.buffer) < self.cfg.replay_size:
                self.buffer.append(refs[i])
            else:
                j = int(torch.randint(0, self.n_seen, (1,), generator=g))
                if j < self.cfg.replay_size:
                    self.buffer[j] = refs[i]

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        sd["replay_buffer"] = torch.tensor(self.buffer, dtype=torch.long).reshape(-1, 2)
        sd["replay_seen"] = torch.tensor(self.n_seen, dtype=torch.long)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        sd = dict(state_dict)
        self.buffer = [(int(a), int(b)) for a, b in sd.pop("replay_buffer").tolist()]
        self.n_seen = int(sd.pop("replay_seen"))
        return super().load_state_dict(sd, strict=strict, assign=assign)
