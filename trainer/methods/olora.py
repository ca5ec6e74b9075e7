"""O-LoRA baseline (orthogonal subspace learning): a new LoRA per task, earlier ones frozen.

Training task t: all LoRAs 0..t are active (their sum), only LoRA t trains, and the loss adds
lambda * sum_{j<t} sum_slots |A_t A_j^T| (L1 of the overlap of their input subspaces).
Inference: the sum of every LoRA trained so far, no task id needed. The pack of task t is the
sum up to t as ONE set: rank (t+1) * r (A stacked, B side by side), see lora.concat_arrays.
"""

from __future__ import annotations

import torch

from .base import PerTaskAdapters, Route, pack_arrays
from .lora import concat_arrays, count


class OLora(PerTaskAdapters):
    name = "olora"

    def orthogonality(self, t: int) -> torch.Tensor:
        new = self.adapters[t]
        total = torch.zeros(())
        for j in range(t):
            old = self.adapters[j]
            for a_new, a_old in zip(new.A, old.A):
                total = total + (a_new @ a_old.detach().T).abs().sum()
        return total

    def training_step(self, batch) -> torch.Tensor:
        t = self.current
        ce = self.loss_with(batch, None, list(self.adapters[: t + 1]))
        return ce + self.cfg.olora_lambda * self.orthogonality(t)

    def route(self, batch) -> Route:
        n = len(batch)
        return Route(batch.task_index.tolist(), [None] * n, ["all"] * n)

    def adapters_for(self, key):
        return list(self.adapters) if key == "all" and len(self.adapters) else None

    def param_counts(self, task_index: int) -> dict[str, int]:
        return {"lora": count(self.adapters[task_index].parameters())}

    def state_for_pack(self, task_id: str) -> dict:
        t = self.task_index_of(task_id)
        return pack_arrays(None, None, concat_arrays(list(self.adapters[: t + 1])))
