"""Accelerate/DDP glue: the same training loop on one process or under `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 -m kaizen.runtime.cli train --method kaizen ...
    torchrun --nproc_per_node 2 -m kaizen.runtime.cli train ...          # the same, without accelerate

(On a machine without CUDA, `--multi_gpu` is what makes accelerate start N processes; with
`--cpu` alone it starts one, and its MULTI_CPU mode needs mpirun.) With WORLD_SIZE > 1 an `accelerate.Accelerator` sets up
the process group (gloo on CPU) and wraps the method (an nn.Module whose forward is its
training step) in DDP plus its optimizer, once per task (the trainable set changes per task).
Every global batch is split into equal contiguous shards, one per process, so the averaged
gradient equals the one-process gradient of the same batch. Evaluation and checkpoints run on
the main process only; the others wait.
"""

from __future__ import annotations

import os


class Dist:
    """Process-group view of a run: world size, rank, wrapping, sharding, barriers."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.accelerator = None
        self.rank = 0
        if self.world > 1:
            import torch
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self.rank = self.accelerator.process_index
            self.world = self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module, optimizer):
        """(model to call, optimizer): DDP + accelerate's optimizer when several processes."""
        if self.accelerator is None:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def backward(self, loss) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def shard(self, items: list) -> list:
        """This process's contiguous share of a global batch (sizes differ by at most one)."""
        if self.world == 1:
            return items
        n = len(items)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return items[lo:hi]

    def usable(self, items: list) -> bool:
        """A global batch every process gets at least one sample of."""
        return len(items) >= self.world

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def finish(self) -> None:
        if self.accelerator is not None:
            self.accelerator.end_training()
