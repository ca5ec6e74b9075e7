"""Joint baseline: ONE LoRA trained once, at the last task, on the union of all tasks' data.

Multi-task training, the usual non-continual reference. Before the last task nothing trains
(rows t < T-1 of the matrix are the base alone), so read joint's MFN (= its final accuracy);
its MFT, MAA and BWT are not meaningful and the reports say so.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Method, Route, pack_arrays
from .lora import count


class Joint(Method):
    name = "joint"

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.adapters = nn.ModuleList()

    def _last(self, task_index: int) -> bool:
        return task_index == len(self.ctx.tasks) - 1

    def begin_task(self, task_index: int, task) -> None:
        super().begin_task(task_index, task)
        if self._last(task_index):
            self.adapters.append(self.new_adapter(0))

    def training_refs(self, task_index: int) -> list[tuple[int, int]]:
        if not self._last(task_index):
            return []
        return [(t, i) for t, task in enumerate(self.ctx.tasks) for i in range(len(task.train))]

    def training_step(self, batch) -> torch.Tensor:
        return self.loss_with(batch, None, [self.adapters[0]] if len(self.adapters) else None)

    def route(self, batch) -> Route:
        n = len(batch)
        return Route(batch.task_index.tolist(), [None] * n, [0 if len(self.adapters) else None] * n)

    def adapters_for(self, key):
        return None if key is None else [self.adapters[key]]

    def param_counts(self, task_index: int) -> dict[str, int]:
        return {"lora": count(self.adapters[0].parameters())} if self._last(task_index) else {"lora": 0}

    def state_for_pack(self, task_id: str) -> dict:
        self.task_index_of(task_id)
        return pack_arrays(None, None, self.adapters[0].arrays() if len(self.adapters) else None)
