"""Built-in base presets as data: the tiny bases for tests/demo/CI, `small` and `medium` benchmark shapes.

Same classes as the real models (LlavaForConditionalGeneration with a CLIP vision tower and a
Llama or Qwen2 language model; CLIPModel for the query encoder), made from a seed. `small` and
`medium` have realistic shapes but random weights: they are for timing, size and memory figures
only. `medium` (~640M parameters, 2.6 GB in fp32; its decoder graph alone is 2.5 GB) is past the
2 GiB protobuf limit, so its export exercises external data (tests/test_external_data.py, slow;
bench/export_memory.py).

Each preset declares its LoRA targets (`lora_targets`): `kaizen base init` / `assemble` record
them in kaizen_base.json, `kaizen base export` builds the decoder's LoRA inputs for them and the
trainer trains them by default. The tiny bases and real-fast keep all 7; `small`, `medium` and
real-small take the attention projections only (their packs stay under 1 % of the base bundle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from kaizen.export.lora_targets import ALL_TARGETS, ATTENTION_TARGETS, parse_targets


@dataclass(frozen=True)
class BasePreset:
    name: str
    text_arch: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch: int
    clip_hidden: int
    clip_layers: int
    clip_dim: int
    clip_image_size: int
    vocab_size: int = 1024  # BPE vocabulary trained on the generic corpus (special tokens included)
    pretrained: bool = True  # False: random weights, say so wherever figures are reported
    lora_targets: tuple[str, ...] = ALL_TARGETS  # the LM Linears that carry LoRA (kaizen_base.json "lora")

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets, f"preset {self.name} lora_targets"))
        if self.text_arch not in ("llama", "qwen2"):
            raise ValueError(f"text_arch must be llama or qwen2, got {self.text_arch!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"preset {self.name}: hidden must divide by heads, heads by kv_heads")
        if self.image_size % self.patch:
            raise ValueError(f"preset {self.name}: image_size must be a multiple of patch")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


_TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vision_hidden=64, vision_layers=2,
             vision_heads=4, image_size=64, patch=8, clip_hidden=64, clip_layers=2, clip_dim=64,
             clip_image_size=64)

PRESETS: dict[str, BasePreset] = {
    "tiny-llama": BasePreset(name="tiny-llama", text_arch="llama", **_TINY),
    "tiny-qwen2": BasePreset(name="tiny-qwen2", text_arch="qwen2", **_TINY),
    "small": BasePreset(name="small", text_arch="llama", hidden=512, layers=8, heads=8, kv_heads=4,
                        intermediate=1408, vision_hidden=384, vision_layers=6, vision_heads=6,
                        image_size=224, patch=16, clip_hidden=256, clip_layers=4, clip_dim=256,
                        clip_image_size=224, vocab_size=8192, pretrained=False, lora_targets=ATTENTION_TARGETS),
    "medium": BasePreset(name="medium", text_arch="llama", hidden=1536, layers=24, heads=12, kv_heads=4,
                         intermediate=4096, vision_hidden=384, vision_layers=6, vision_heads=6,
                         image_size=224, patch=16, clip_hidden=256, clip_layers=4, clip_dim=256,
                         clip_image_size=224, vocab_size=8192, pretrained=False, lora_targets=ATTENTION_TARGETS),
}


def get_preset(name: str) -> BasePreset:
    if name not in PRESETS:
        raise ValueError(f"unknown base preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass(frozen=True)
class RealPreset:
    """A real base assembled from packaged pretrained parts (`kaizen base assemble`).

    image_size: DINOv2 input (patch 14): 224 -> 256 image tokens; lm: "tiny" (the built-in tiny
    Llama, random init, trained by `kaizen base pretrain`) or "smollm2-135m" (frozen, real);
    train_lm: whether `kaizen base pretrain` trains the LM too (LLaVA stage 1 trains only the
    projector, right for a real LM; a random tiny LM must learn language first); fixed_head: the
    tiny LM's output head is a fixed random projection (std 1/sqrt(d)) that stage 1 leaves alone, so
    answer words stage 1 never produced stay learnable by a pack (README "A fixed output head");
    method_defaults: the method options a run on this base gets unless it passes its own.
    """

    name: str
    lm: str
    image_size: int = 224
    train_lm: bool = False
    fixed_head: bool = False
    cls_token: bool = True  # the tower's CLS row is an image token too (LLaVA strategy "full")
    vision: str = "dinov2-s14"
    text: str = "all-minilm-l6-v2"
    lora_targets: tuple[str, ...] = ALL_TARGETS
    # the method options measured best on this base (kaizen_base.json "method_defaults"; explicit
    # --option values win): one pack per part and image-conditioned prompts (README "Image-conditioned prompts")
    method_defaults: dict = field(default_factory=lambda: {"top_k": 1, "prompt_net": 16})

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", parse_targets(self.lora_targets, f"preset {self.name} lora_targets"))
        if self.lm not in ("tiny", "smollm2-135m"):
            raise ValueError(f"preset {self.name}: lm must be tiny or smollm2-135m, got {self.lm!r}")
        if self.fixed_head and not (self.lm == "tiny" and self.train_lm):
            raise ValueError(f"preset {self.name}: fixed_head is for the tiny LM trained in stage 1 (lm tiny, train_lm)")
        if self.image_size % 14:
            raise ValueError(f"preset {self.name}: image_size must be a multiple of 14 (DINOv2 patch)")

    def to_dict(self) -> dict:
        return asdict(self)


REAL_PRESETS: dict[str, RealPreset] = {
    "real-fast": RealPreset(name="real-fast", lm="tiny", image_size=112, train_lm=True, fixed_head=True),
    # Attention-only LoRA: packs 9.7 -> ~4 MiB (pack/base 1.2 -> ~0.5 %). Measured on real-fast
    # (kaizen, top_k 1 + prompt_net 16, seeds 0-2): MFN 87.9 +- 2.2 attention-only vs 87.4 +- 2.5 all 7.
    "real-small": RealPreset(name="real-small", lm="smollm2-135m", image_size=112, train_lm=False,
                             lora_targets=ATTENTION_TARGETS),
}


def get_real_preset(name: str) -> RealPreset:
    if name not in REAL_PRESETS:
        raise ValueError(f"unknown real base preset {name!r}; choose one of {sorted(REAL_PRESETS)}")
    return REAL_PRESETS[name]


def recipe_drift(recorded: dict) -> list[str]:
    """Fields where a base's recorded preset (kaizen_base.json "preset") differs from today's recipe
    of the same name, e.g. ["fixed_head"] for a real-fast base assembled before its output head was
    fixed; [] when it matches or the name is not a built-in preset (a user's own base)."""
    name = recorded.get("name")
    current = REAL_PRESETS.get(name) or PRESETS.get(name)
    if current is None:
        return []
    today = json.loads(json.dumps(current.to_dict()))  # as written to JSON: lists, not tuples
    return sorted(k for k in today if recorded.get(k) != today[k])
