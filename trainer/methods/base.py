"""The interface every continual method implements, and the decoding they share.

A method is an nn.Module holding only ITS parameters (prompts, keys, LoRA adapters); the frozen
base, CLIP and feature cache come in a `Context`. The training loop calls, for each task t:

    method.begin_task(t, task)
    for batch in batches(method.training_refs(t)):     # refs into the feature cache
        loss = method.training_step(batch); loss.backward(); optimizer.step()
    method.end_task(t, task)
    pred = method.predict(batch)                        # answers (+ selected task for selection methods)
    method.state_for_pack(task_id)                      # {"prompt", "key", "lora", "prompt_net"}: a pack

`forward(batch)` is `training_step(batch)`, so DDP/accelerate can wrap a method unchanged.
Decoding rule (the Station does the same): when the selected task (the true task for methods
without selection) declares a closed answer set, score the candidates; else decode greedily.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from kaizen.export.lora_targets import base_lora_targets, check_within, parse_targets
from kaizen.runtime.errors import ConfigError

from . import lm
from .lora import LoraAdapter, Slots, activated, ensure_slots


@dataclass
class MethodConfig:
    """Hyper-parameters of the methods (each method reads the ones it uses)."""

    prompt_tokens: int = 10
    top_k: int = 3
    alpha: float = 0.5
    lora_rank: int = 8
    lora_scale: float = 2.0  # alpha / r, folded into B when a pack is written
    lora_targets: tuple[str, ...] | None = None  # None: the base's own (kaizen_base.json lora.targets)
    prompt_lr_mult: float = 10.0  # prompts, keys and prompt nets learn at lr * this
    prompt_net: int = 0  # hidden width of the image-conditioned prompt's meta-net; 0 = a static prompt
    replay_size: int = 60  # reservoir capacity (samples, all tasks together)
    olora_lambda: float = 0.5
    max_new_tokens: int = 8

    def __post_init__(self):
        if self.lora_targets is not None:
            self.lora_targets = parse_targets(self.lora_targets, "method option lora_targets")
        for name in ("prompt_tokens", "top_k", "lora_rank", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"method option {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method option alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.prompt_net <= 1024:
            raise ConfigError(f"method option prompt_net (meta-net width) must be in 0..1024, got {self.prompt_net}")
        if self.replay_size < 0 or self.olora_lambda < 0:
            raise ConfigError("method options replay_size and olora_lambda must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = None if self.lora_targets is None else list(self.lora_targets)
        return d

    def for_base(self, base) -> MethodConfig:
        """This config with lora_targets resolved against `base` (a loaded Base): None becomes the
        base's targets; explicit ones must be among them (ConfigError naming the others)."""
        where = f"{base.path}/kaizen_base.json"
        available = base_lora_targets(base.info, where)
        if self.lora_targets is None:
            return replace(self, lora_targets=available)
        check_within(self.lora_targets, available, "method option lora_targets", f"base {base.path}",
                     f"leave lora_targets out to train the base's own (or add the targets to {where} "
                     "\"lora.targets\" and export the bundle again)")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown method option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def base_method_defaults(info: dict, where: str = "kaizen_base.json") -> dict:
    """The method options a base declares as its measured best (kaizen_base.json "method_defaults",
    e.g. {"top_k": 1, "prompt_net": 16} on the real bases; {} when absent). Checked like --option
    values: ConfigError naming the file for an unknown option or a bad value."""
    defaults = (info or {}).get("method_defaults", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: \"method_defaults\" must be an object of method options, got {defaults!r}")
    try:
        MethodConfig.from_dict(defaults)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{where}: \"method_defaults\" {defaults}: {err}; fix the file or remove the entry") from None
    return dict(defaults)


@dataclass
class Context:
    """What a method may use besides its own parameters."""

    base: object  # kaizen.export.loading.Base (frozen)
    features: object  # kaizen.trainer.features.FeatureCache
    tasks: list  # the whole stream (answer sets; training data of the current task)
    seed: int = 0


@dataclass
class Route:
    """How each request of a batch is answered."""

    selected: list[int]  # task index deciding the answer set (and, for selection, the pack)
    prompts: list[torch.Tensor | None]
    adapter: list[object]  # key passed to `adapters_for`; None = base only
    scores: torch.Tensor | None = None  # [B, seen] selection scores


@dataclass
class Prediction:
    answers: list[str]
    selected: list[int]
    scores: torch.Tensor | None = None


class Method(nn.Module):
    """Base class; see the module docstring for the protocol."""

    name = ""
    uses_selection = False
    uses_lora = True

    def __init__(self, ctx: Context, cfg: MethodConfig):
        super().__init__()
        cfg = cfg.for_base(ctx.base) if self.uses_lora else cfg
        self.ctx, self.cfg = ctx, cfg
        self.seen: list[int] = []  # task indices begun, in order
        self.current = -1
        self.slots: Slots | None = ensure_slots(ctx.base, cfg.lora_targets) if self.uses_lora else None

    # --- protocol -------------------------------------------------------------------------------
    def begin_task(self, task_index: int, task) -> None:
        self.current = task_index
        if task_index not in self.seen:
            self.seen.append(task_index)

    def training_refs(self, task_index: int) -> list[tuple[int, int]]:
        """(task index, sample index) pairs to train on for this task (default: its train split)."""
        return [(task_index, i) for i in range(len(self.ctx.tasks[task_index].train))]

    def training_step(self, batch) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch) -> torch.Tensor:
        return self.training_step(batch)

    def end_task(self, task_index: int, task) -> None:
        for p in self.parameters():
            p.requires_grad_(False)

    def trainable_parameters(self, task_index: int) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, task_index: int, lr: float) -> list[dict]:
        return [{"params": self.trainable_parameters(task_index), "lr": lr}]

    def route(self, batch) -> Route:
        raise NotImplementedError

    def adapters_for(self, key) -> list[LoraAdapter] | None:
        return None

    def state_for_pack(self, task_id: str) -> dict:
        return {"prompt": None, "key": None, "lora": None, "prompt_net": None}

    def param_counts(self, task_index: int) -> dict[str, int]:
        """Parameters trained for this task, by kind (prompt, key, lora)."""
        return {}

    # --- helpers --------------------------------------------------------------------------------
    def task_index_of(self, task_id: str) -> int:
        ids = [t.task_id for t in self.ctx.tasks]
        if task_id not in ids:
            raise ConfigError(f"task {task_id!r} is not in this stream ({ids})")
        return ids.index(task_id)

    def generator(self, task_index: int, salt: int = 0) -> torch.Generator:
        """Deterministic per (seed, task, salt): a resumed run re-creates identical inits."""
        return torch.Generator().manual_seed(int(self.ctx.seed) * 1_000_003 + task_index * 7919 + salt)

    def new_adapter(self, task_index: int) -> LoraAdapter:
        assert self.slots is not None
        return LoraAdapter(self.slots, self.cfg.lora_rank, self.cfg.lora_scale, self.generator(task_index, 1))

    def loss_with(self, batch, prompts, adapters) -> torch.Tensor:
        with activated(self.slots, adapters):
            return lm.answer_loss(self.ctx.base, batch.image, batch.instructions, prompts, batch.answers)

    # --- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, batch) -> Prediction:
        route = self.route(batch)
        answers: list[str] = [""] * len(batch)
        groups: dict[object, list[int]] = {}
        for i, key in enumerate(route.adapter):
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            with activated(self.slots, self.adapters_for(key)):
                self._decode_group(batch, route, idx, answers)
        return Prediction(answers, list(route.selected), route.scores)

    def _decode_group(self, batch, route: Route, idx: list[int], answers: list[str]) -> None:
        base = self.ctx.base
        closed = [i for i in idx if self.ctx.tasks[route.selected[i]].answers]
        open_ = [i for i in idx if i not in set(closed)]
        for part, fn in ((closed, self._score), (open_, self._greedy)):
            if part:
                sub = torch.as_tensor(part, dtype=torch.long)
                texts = fn(base, batch.image[sub], [batch.instructions[i] for i in part],
                           [route.prompts[i] for i in part], [route.selected[i] for i in part])
                for i, text in zip(part, texts):
                    answers[i] = text

    def _score(self, base, image, instructions, prompts, selected) -> list[str]:
        cands = [list(self.ctx.tasks[s].answers) for s in selected]
        picks = lm.score_candidates(base, image, instructions, prompts, cands)
        return [c[p] for c, p in zip(cands, picks)]

    def _greedy(self, base, image, instructions, prompts, selected) -> list[str]:
        return lm.greedy(base, image, instructions, prompts, self.cfg.max_new_tokens)


def pack_arrays(prompt: torch.Tensor | None, key: torch.Tensor | None, lora: dict | None,
                split: int | None = None, prompt_net: dict | None = None) -> dict:
    """state_for_pack's dict with float32 numpy arrays. The key is unit-normalised: as a whole (one
    shared key), or each side of `split` (image key [:split], text key [split:]) for unaligned queries.
    `prompt_net`: {"W1", "W2"} of an image-conditioned prompt (runtime/prompt_net.py), else None."""
    out = {"prompt": None, "key": None, "lora": lora, "prompt_net": prompt_net}
    if prompt is not None:
        out["prompt"] = prompt.detach().float().numpy().copy()
    if key is not None:
        k = key.detach().float()
        parts = [k] if split is None else [k[:split], k[split:]]
        out["key"] = torch.cat([p / p.norm().clamp_min(1e-12) for p in parts]).numpy().astype(np.float32)
    return out


class PerTaskAdapters(Method):
    """A method that starts one new LoRA adapter per task (individual, olora)."""

    def __init__(self, ctx, cfg: MethodConfig):
        super().__init__(ctx, cfg)
        self.adapters = nn.ModuleList()

    def begin_task(self, task_index: int, task) -> None:
        super().begin_task(task_index, task)
        assert len(self.adapters) == task_index, "tasks must begin in stream order"
        self.adapters.append(self.new_adapter(task_index))
