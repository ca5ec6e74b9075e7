"""Kaizen (the default method): ModalPrompt plus a small per-task LoRA, selected by the same key.

Training task t: prompts as in ModalPrompt ([P_t] + the k-1 best earlier ones) with task t's
LoRA active on the language model. Inference: the top-k prompts of all seen tasks best first,
and the top-1 task's LoRA. `state_for_pack(task_id)` = {prompt [P, d], key [d_clip], lora, prompt_net} is
exactly what a task pack carries; the Station selects with numpy, concatenates the prompts in
the same order and feeds the top-1 pack's LoRA.
"""

from __future__ import annotations

from .modalprompt import ModalPrompt


class Kaizen(ModalPrompt):
    name = "kaizen"
    uses_lora = True
    per_task_lora = True
