"""Run folders: per-task checkpoints (safetensors + JSON) and run.json, written atomically.

    RUN/run.json                          config, stream, one row per finished task (metrics...)
    RUN/tasks/<i>_<task_id>/state.safetensors   the method's whole state after task i
    RUN/tasks/<i>_<task_id>/pack.safetensors    what a pack of task i carries: prompt, key, lora.*
                                          (B already scaled), text_emb [n_instr, d_clip]
    RUN/tasks/<i>_<task_id>/task.json           that task's row (accuracies, timings, sizes)

A crashed run resumes from the last task listed in run.json (`kaizen train --resume`): files of
a task are complete before run.json names it. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from kaizen.runtime.errors import ConfigError

RUN_JSON = "run.json"


def task_dir(run: Path, task_index: int, task_id: str) -> Path:
    return Path(run) / "tasks" / f"{task_index}_{task_id}"


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pack_tensors(pack: dict) -> dict[str, np.ndarray]:
    """Flatten state_for_pack's dict: "prompt", "key", "lora.{i}.{target}.{A|B}", "prompt_net.{W1|W2}"."""
    out = {}
    for name in ("prompt", "key"):
        if pack.get(name) is not None:
            out[name] = np.ascontiguousarray(pack[name], dtype=np.float32)
    for name, arr in (pack.get("lora") or {}).items():
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    for name, arr in (pack.get("prompt_net") or {}).items():
        out[f"prompt_net.{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def save_task(run: Path, task_index: int, task_id: str, method, info: dict,
              extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write one finished task's method state, pack arrays (+ `extra` arrays, e.g. text_emb) and
    row (before run.json names it)."""
    d = task_dir(run, task_index, task_id)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in method.state_dict().items()}
    if state:
        save_file(state, str(d / "state.safetensors.tmp"))
        os.replace(d / "state.safetensors.tmp", d / "state.safetensors")
    pack = pack_tensors(method.state_for_pack(task_id))
    pack.update({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (extra or {}).items()})
    if pack:
        save_numpy(pack, str(d / "pack.safetensors.tmp"))
        os.replace(d / "pack.safetensors.tmp", d / "pack.safetensors")
    write_json(d / "task.json", info)
    return d


def load_state(run: Path, task_index: int, task_id: str) -> dict[str, torch.Tensor]:
    path = task_dir(run, task_index, task_id) / "state.safetensors"
    if not path.exists():
        return {}
    return load_file(str(path))


def read_run(run: Path) -> dict:
    path = Path(run) / RUN_JSON
    if not path.exists():
        raise ConfigError(f"{path} does not exist: {run} is not a training run folder (run `kaizen train` first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); the run folder is damaged") from err
