"""LoRA fine-tuning baseline: ONE shared LoRA trained task after task (the forgetting bound).

No selection: each request is decoded with the true task's answer set. The pack of any task is
the shared LoRA as it is after that task (the latest state for every task id).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Method, Route, pack_arrays
from .lora import count


class LoraFT(Method):
    name = "lora_ft"

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.adapters = nn.ModuleList()

    def begin_task(self, task_index: int, task) -> None:
        super().begin_task(task_index, task)
        if not len(self.adapters):
            self.adapters.append(self.new_adapter(0))
        self.adapters[0].requires_grad_(True)

    def training_step(self, batch) -> torch.Tensor:
        return self.loss_with(batch, None, [self.adapters[0]])

    def route(self, batch) -> Route:
        n = len(batch)
        return Route(batch.task_index.tolist(), [None] * n, [0] * n)

    def adapters_for(self, key):
        return None if key is None or not len(self.adapters) else [self.adapters[key]]

    def param_counts(self, task_index: int) -> dict[str, int]:
        return {"lora": count(self.adapters[0].parameters())}

    def state_for_pack(self, task_id: str) -> dict:
        self.task_index_of(task_id)
        return pack_arrays(None, None, self.adapters[0].arrays())
