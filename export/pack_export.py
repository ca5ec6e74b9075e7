"""Export one task of a training run as a signed task pack (.kpk).

    kaizen export pack RUN TASK --bundle BUNDLE --key keys/signer.ed25519.key --out TASK-1.kpk [--version 1]

The version defaults to the run's: 1 for a `kaizen train` run, N+1 for the task a
`kaizen train --continue` run improved (its pack_meta.json says which).

Reads what the trainer left in RUN/tasks/<i>_<TASK>/: pack.safetensors (prompt, key, lora.*, prompt_net.*) and
pack_meta.json (instructions, answer set, golden samples, metrics, base fingerprint). The text
queries of the instructions are computed with the bundle's own text tower (clip_text.onnx or
text_query.onnx), so they are exactly what the station would compute. Bundles with unaligned
query encoders get schema 2 packs (one key per modality). The run's base must be the bundle's base,
and the run's LoRA targets must be among the bundle's (base.json lora.targets): a pack carries the
arrays of the targets it was trained on only; the decoder's other LoRA inputs default to zero.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import ConfigError, PackError
from kaizen.runtime.keys import load_signing_key
from kaizen.runtime.pack import build_pack
from kaizen.runtime.pack_arrays import GoldenSample, check_lora_fits

PACK_META = "pack_meta.json"


def find_task_dir(run: Path, task_id: str) -> Path:
    matches = sorted((Path(run) / "tasks").glob(f"*_{task_id}"))
    matches = [m for m in matches if m.name.split("_", 1)[1] == task_id]
    if not matches:
        raise ConfigError(f"{run}/tasks has no finished task {task_id!r}; check the task id or finish training")
    return matches[-1]


def read_task(task_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta_path, arrays_path = task_dir / PACK_META, task_dir / "pack.safetensors"
    for p in (meta_path, arrays_path):
        if not p.exists():
            raise ConfigError(f"{p} is missing: this method produces no task pack (use kaizen or modalprompt)")
    return json.loads(meta_path.read_text()), load_file(str(arrays_path))


def export_pack(task_dir, out, *, bundle: Bundle, signing_key, version: int | None = None,
                engine: Engine | None = None):
    """Build and sign the pack of one finished task; return its Manifest. `version` None = the
    task's own: pack_meta.json's "version" (written by `kaizen train --continue`), else 1."""
    task_dir = Path(task_dir)
    meta, arrays = read_task(task_dir)
    version = int(meta.get("version", 1)) if version is None else version
    if meta["base_fingerprint"] != bundle.fingerprint:
        raise PackError(f"{task_dir} was trained on base {meta['base_fingerprint'][:12]}..., but bundle "
                        f"{bundle.path} is {bundle.fingerprint[:12]}...: export the run's own base")
    if "key" not in arrays or "prompt" not in arrays:
        raise ConfigError(f"{task_dir}/pack.safetensors has no prompt/key: method {meta['method']} is not selectable")
    engine = engine or Engine(bundle)
    lora = {k: v for k, v in arrays.items() if k.startswith("lora.")}
    net = {k.split(".", 1)[1]: v.astype(np.float32) for k, v in arrays.items() if k.startswith("prompt_net.")}
    try:
        check_lora_fits(lora, bundle.lora_shapes())
    except ValueError as err:
        raise PackError(f"cannot export {task_dir} for bundle {bundle.path}: {err}") from None
    golden = [GoldenSample((task_dir / g["image"]).read_bytes(), g["instruction"], g["answer"])
              for g in meta.get("golden", [])]
    rank = max((v.shape[0] for k, v in lora.items() if k.endswith(".A")), default=0)
    key = arrays["key"].astype(np.float32)
    dims = None if engine.aligned else list(engine.query_dims)  # schema 2: one key per modality
    halves = [key] if dims is None else [key[: dims[0]], key[dims[0]:]]
    key = np.concatenate([h / np.linalg.norm(h) for h in halves])
    return build_pack(out, task_id=meta["task_id"], version=version, method=meta["method"],
                      base_fingerprint=bundle.fingerprint, prompt=arrays["prompt"].astype(np.float32),
                      key=key, text_emb=engine.text_query(meta["instructions"]), query_dims=dims,
                      lora=lora, instructions=meta["instructions"], answers=meta.get("answers"), golden=golden,
                      metrics=meta.get("metrics", {}), prompt_tokens=int(arrays["prompt"].shape[0]),
                      lora_rank=int(rank), signing_key=signing_key, prompt_net=net or None)


def cli_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kaizen export pack", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="training run folder (kaizen train --out RUN)")
    ap.add_argument("task", help="task id, e.g. seal_defect")
    ap.add_argument("--bundle", required=True, help="the base bundle the stations run")
    ap.add_argument("--key", required=True, help="Ed25519 signing key (kaizen keys gen --kind signing)")
    ap.add_argument("--out", required=True, help="pack file to write, e.g. seal_defect-1.kpk")
    ap.add_argument("--version", type=int, default=None, help="pack version, an increasing integer per task "
                    "(default: the run's: 1, or N+1 for a kaizen train --continue run)")
    a = ap.parse_args(argv)
    bundle = Bundle.open(a.bundle)
    m = export_pack(find_task_dir(Path(a.run), a.task), a.out, bundle=bundle, signing_key=load_signing_key(a.key),
                    version=a.version)
    size = Path(a.out).stat().st_size
    print(f"wrote {a.out}: {m.task_id} v{m.version}, {size / 1024:.1f} KiB, signed by {m.signing_key_id}")
    return 0
