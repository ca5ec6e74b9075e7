"""Which Linear layers of a base's language model carry LoRA: data of the base, read everywhere.

A base folder records its targets in kaizen_base.json as {"lora": {"targets": [...]}} (written by
`kaizen base init` / `kaizen base assemble` from the preset); a bundle records the targets its
decoder.onnx takes as inputs in base.json "lora.targets". A base without the field (made before
targets were data) has all 7: q, k, v, o, gate, up, down.

    targets = base_lora_targets(base.info)                   # the base's, or all 7 for old bases
    targets = parse_targets("q_proj,v_proj", "--lora-targets")
    check_within(("q_proj",), targets, "lora_targets", "base bases/small", fix)   # ConfigError if not
"""

from __future__ import annotations

from kaizen.runtime.errors import ConfigError

# The target names, here (no torch) so that presets and configs read them; export/wrappers.py
# re-exports them as DEFAULT_TARGETS / ATTN_TARGETS.
ATTENTION_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_TARGETS: tuple[str, ...] = ATTENTION_TARGETS + ("gate_proj", "up_proj", "down_proj")


def parse_targets(value, what: str) -> tuple[str, ...]:
    """A comma string or a list of target names -> tuple, checked: known, not empty, no repeats."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ConfigError(f"{what}: expected a list of target names among {list(ALL_TARGETS)}, got {value!r}")
    targets = tuple(t.strip() for t in items if t.strip())
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad or not targets:
        raise ConfigError(f"{what} {list(targets)}: choose one or more among {list(ALL_TARGETS)}"
                          + (f" ({bad} unknown)" if bad else ""))
    if len(set(targets)) != len(targets):
        raise ConfigError(f"{what} {list(targets)}: a target is listed twice")
    return targets


def base_lora_targets(info: dict, where: str = "kaizen_base.json") -> tuple[str, ...]:
    """The LoRA targets a base declares (kaizen_base.json "lora.targets"); all 7 when it has none."""
    lora = (info or {}).get("lora")
    if lora is None:
        return ALL_TARGETS
    if not isinstance(lora, dict) or "targets" not in lora:
        raise ConfigError(f"{where}: \"lora\" must be an object with \"targets\" (a list of target names "
                          f"among {list(ALL_TARGETS)}); fix the file or remove the \"lora\" entry for all 7")
    return parse_targets(lora["targets"], f"{where} lora.targets")


def check_within(requested, available, what: str, owner: str, fix: str) -> tuple[str, ...]:
    """`requested` targets, refused with a ConfigError naming the ones `owner` does not have."""
    requested = tuple(requested)
    missing = [t for t in requested if t not in available]
    if missing:
        raise ConfigError(f"{what} {list(requested)}: {owner} has no LoRA target {missing} (its targets are "
                          f"{list(available)}); choose among those, or {fix}")
    return requested
