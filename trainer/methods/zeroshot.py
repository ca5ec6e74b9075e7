"""Zero-shot baseline: the frozen base alone (no prompt, no LoRA, nothing trains)."""

from __future__ import annotations

import torch

from .base import Method, Route


class ZeroShot(Method):
    name = "zeroshot"
    uses_lora = False

    def training_refs(self, task_index: int) -> list[tuple[int, int]]:
        return []

    def training_step(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_with(batch, None, None)

    def route(self, batch) -> Route:
        n = len(batch)
        return Route(batch.task_index.tolist(), [None] * n, [None] * n)
