"""Individual baseline (upper bound): one LoRA per task, used with the ORACLE task id.

A task not trained yet (upper triangle of the full matrix) is answered by the base alone.
"""

from __future__ import annotations

import torch

from .base import PerTaskAdapters, Route, pack_arrays
from .lora import count


class Individual(PerTaskAdapters):
    name = "individual"

    def training_step(self, batch) -> torch.Tensor:
        return self.loss_with(batch, None, [self.adapters[self.current]])

    def route(self, batch) -> Route:
        true = batch.task_index.tolist()
        return Route(true, [None] * len(true), [t if t < len(self.adapters) else None for t in true])

    def adapters_for(self, key):
        return None if key is None else [self.adapters[key]]

    def param_counts(self, task_index: int) -> dict[str, int]:
        return {"lora": count(self.adapters[task_index].parameters())}

    def state_for_pack(self, task_id: str) -> dict:
        return pack_arrays(None, None, self.adapters[self.task_index_of(task_id)].arrays())
