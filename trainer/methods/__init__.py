"""Continual methods: one file each, one registry, one interface (base.py).

    from kaizen.trainer.methods import METHODS, build_method
    method = build_method("kaizen", ctx, MethodConfig())
"""

from __future__ import annotations

from kaizen.runtime.errors import ConfigError

from .base import Context, Method, MethodConfig, Prediction, Route
from .individual import Individual
from .joint import Joint
from .kaizen import Kaizen
from .lora_ft import LoraFT
from .modalprompt import ModalPrompt
from .olora import OLora
from .replay import Replay
from .zeroshot import ZeroShot

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Kaizen, ModalPrompt, LoraFT, Replay, OLora, Individual, Joint, ZeroShot)}

DEFAULT_METHOD = "kaizen"

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Context",
    "Method",
    "MethodConfig",
    "Prediction",
    "Route",
    "build_method",
]


def build_method(name: str, ctx: Context, cfg: MethodConfig | None = None) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name](ctx, cfg or MethodConfig())
