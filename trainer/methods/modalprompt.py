"""ModalPrompt (arXiv 2410.05849): per-task prototype prompts chosen by dual-modality similarity.

Per task t: a prompt P_t [P, d_model] (inserted after BOS) and a key k_t [d_clip], a plain
learnable vector (d_clip parameters, not an MLP), initialised at the task's prototype (the
normalised mean of its training queries). Query = the normalised CLIP image embedding and CLIP
text embedding of the instruction;

    score_t = a * cos(img, k_t) + (1 - a) * cos(txt, k_t),  a = 0.5

Training task t: prompts = [P_t] + the k-1 best earlier ones by score (detached, frozen), loss =
CE + (1 - cos(img, k_t)) + (1 - cos(txt, k_t)). Inference: the top-k of all seen tasks, fused by
concatenation best first; the top-1 is the selected task (its answer set decides decoding).
Every task's prompt trains, the last one included (the reference code's last prompt did not).

With the method option `prompt_net` = h > 0, each task's prompt is image-conditioned (after CoCoOp):
P_t(q) = P_t + reshape(relu(W1 q) W2^T), q the unit image query, W1 [h, d_img] random, W2 zeros
(so training starts at the static prompt); W1/W2 travel in the pack (runtime/prompt_net.py).

`torch_scores` / `torch_top_k` are the torch twin of kaizen.runtime.selection (parity test).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kaizen.runtime.selection import ALPHA

from .base import Method, Route, pack_arrays
from .lora import count


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def torch_split_keys(keys: torch.Tensor, d_img: int, d_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch twin of kaizen.runtime.selection.split_keys (shared key, or one per modality)."""
    width = keys.shape[-1]
    if width == d_img == d_txt:
        return keys, keys
    assert width == d_img + d_txt, f"key width {width} fits neither {d_img} nor {d_img} + {d_txt}"
    return keys[..., :d_img], keys[..., d_img:]


def torch_scores(q_img: torch.Tensor, q_txt: torch.Tensor, keys: torch.Tensor, alpha: float = ALPHA):
    """[B, d_img] image queries, [B, d_txt] text queries, [T, d] or [T, d_img + d_txt] keys -> [B, T]."""
    k_img, k_txt = torch_split_keys(keys.float(), q_img.shape[-1], q_txt.shape[-1])
    return alpha * (_unit(q_img.float()) @ _unit(k_img).T) + (1.0 - alpha) * (_unit(q_txt.float()) @ _unit(k_txt).T)


def torch_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] indices best first; ties -> lower index (stable sort, as numpy's argsort(-s))."""
    k = min(k, scores.shape[1])
    return torch.sort(-scores, dim=1, stable=True).indices[:, :k]


class PromptNet(nn.Module):
    """Task prompt conditioned on the image query: the torch twin of runtime/prompt_net.conditioned."""

    def __init__(self, d_img: int, tokens: int, d_model: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.W1 = nn.Parameter(torch.randn(hidden, d_img, generator=generator) / math.sqrt(d_img))
        self.W2 = nn.Parameter(torch.zeros(tokens * d_model, hidden))

    def forward(self, prompt: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """prompt [R, d], unit image queries q [B, d_img] -> [B, R, d]."""
        return prompt + (torch.relu(q @ self.W1.T) @ self.W2.T).view(len(q), *prompt.shape)

    def arrays(self) -> dict:
        return {"W1": self.W1.detach().float().numpy().copy(), "W2": self.W2.detach().float().numpy().copy()}


class ModalPrompt(Method):
    name = "modalprompt"
    uses_selection = True
    uses_lora = False
    per_task_lora = False

    def __init__(self, ctx, cfg):
        super().__init__(ctx, cfg)
        self.prompts = nn.ParameterList()
        self.keys = nn.ParameterList()
        self.adapters = nn.ModuleList()
        self.nets = nn.ModuleList()  # PromptNet per task when cfg.prompt_net > 0

    def begin_task(self, task_index: int, task) -> None:
        super().begin_task(task_index, task)
        assert len(self.prompts) == task_index, "tasks must begin in stream order"
        table = self.ctx.base.model.get_input_embeddings().weight
        rows = torch.randint(0, table.shape[0], (self.cfg.prompt_tokens,), generator=self.generator(task_index))
        self.prompts.append(nn.Parameter(table[rows].detach().clone().float()))
        self.keys.append(nn.Parameter(self._prototype(task)))
        if self.cfg.prompt_net:
            d_img = self.ctx.features.query_dims[0]
            self.nets.append(PromptNet(d_img, self.cfg.prompt_tokens, table.shape[1], self.cfg.prompt_net,
                                       self.generator(task_index, 2)))
        if self.per_task_lora:
            self.adapters.append(self.new_adapter(task_index))

    def _prototype(self, task) -> torch.Tensor:
        """The task's mean queries: one shared key (aligned CLIP) or [key_img ; key_txt] (unaligned)."""
        f = self.ctx.features.split(task, "train")
        img, txt = _unit(f.clip_img.mean(0)), _unit(f.clip_txt.mean(0))
        if self.ctx.features.aligned:
            return _unit(img + txt).clone()
        return torch.cat([img, txt]).clone()

    def prompt_for(self, j: int, q: torch.Tensor) -> torch.Tensor:
        """Task j's prompt for unit image queries q [B, d_img] -> [B, R, d] (the same rows for every
        part unless the method conditions prompts on the image)."""
        if len(self.nets):
            return self.nets[j](self.prompts[j], q)
        return self.prompts[j].unsqueeze(0).expand(len(q), -1, -1)

    def fused(self, own: torch.Tensor, rows: list[list[int]], q: torch.Tensor) -> list[torch.Tensor]:
        """Per part b: own[b] ([R, d], or None to leave it out) then the prompts of tasks rows[b]
        (detached), concatenated best first, as a station fuses the selected packs. Each task's
        prompts are made once for the whole batch."""
        per_task = {j: self.prompt_for(j, q).detach() for j in sorted({j for row in rows for j in row})}
        return [torch.cat(([] if own is None else [own[b]]) + [per_task[j][b] for j in row])
                for b, row in enumerate(rows)]

    def _train_prompts(self, batch, t: int) -> list[torch.Tensor]:
        extra = self.cfg.top_k - 1
        own = self.prompt_for(t, batch.clip_img)
        if t == 0 or extra == 0:
            return list(own)
        keys = torch.stack([self.keys[j] for j in range(t)]).detach()
        best = torch_top_k(torch_scores(batch.clip_img, batch.clip_txt, keys, self.cfg.alpha), extra)
        return self.fused(own, best.tolist(), batch.clip_img)

    def training_step(self, batch) -> torch.Tensor:
        t = self.current
        adapters = [self.adapters[t]] if self.per_task_lora else None
        ce = self.loss_with(batch, self._train_prompts(batch, t), adapters)
        k_img, k_txt = torch_split_keys(self.keys[t], batch.clip_img.shape[-1], batch.clip_txt.shape[-1])
        key_loss = (1 - batch.clip_img @ _unit(k_img)).mean() + (1 - batch.clip_txt @ _unit(k_txt)).mean()
        return ce + key_loss

    def route(self, batch) -> Route:
        keys = torch.stack(list(self.keys)).detach()
        scores = torch_scores(batch.clip_img, batch.clip_txt, keys, self.cfg.alpha)
        best = torch_top_k(scores, self.cfg.top_k).tolist()
        prompts = self.fused(None, best, batch.clip_img)
        selected = [row[0] for row in best]
        adapter = list(selected) if self.per_task_lora else [None] * len(batch)
        return Route(selected, prompts, adapter, scores)

    def adapters_for(self, key):
        return None if key is None else [self.adapters[key]]

    def param_groups(self, task_index: int, lr: float) -> list[dict]:
        t = task_index
        fast = [self.prompts[t], self.keys[t]] + (list(self.nets[t].parameters()) if len(self.nets) else [])
        groups = [{"params": fast, "lr": lr * self.cfg.prompt_lr_mult}]
        if self.per_task_lora:
            groups.append({"params": list(self.adapters[t].parameters()), "lr": lr})
        return groups

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        return [p for g in self.param_groups(task_index, 1.0) for p in g["params"]]

    def param_counts(self, task_index: int) -> dict[str, int]:
        t = task_index
        out = {"prompt": self.prompts[t].numel(), "key": self.keys[t].numel()}
        if len(self.nets):
            out["prompt_net"] = count(self.nets[t].parameters())
        if self.per_task_lora:
            out["lora"] = count(self.adapters[t].parameters())
        return out

    def state_for_pack(self, task_id: str) -> dict:
        t = self.task_index_of(task_id)
        lora = self.adapters[t].arrays() if self.per_task_lora else None
        split = None if self.ctx.features.aligned else self.ctx.features.query_dims[0]
        net = self.nets[t].arrays() if len(self.nets) else None
        return pack_arrays(self.prompts[t], self.keys[t], lora, split, net)
