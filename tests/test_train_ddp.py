"""Training under `accelerate launch` with 2 CPU processes (DDP, gloo) matches one process.

Slow (two interpreters start torch and the tiny base): run with `pytest -m slow`.
On a CPU-only machine `accelerate launch --multi_gpu --num_processes 2` starts the 2 processes
(`--cpu` alone starts one). Each global batch is split in two shards, so the averaged gradient
is the one-process gradient up to float rounding (the loss is a per-sample mean, so equal
shards average exactly); parameters agree to a relative 1e-3, the accuracy matrix exactly.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kaizen.trainer.bases import init_base

ARGS = ["--method", "kaizen", "--n-train", "16", "--n-test", "8", "--max-tasks", "2", "--epochs", "2",
        "--batch-size", "8", "--threads", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    base = init_base("tiny-llama", tmp_path / "b", seed=0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", KAIZEN_PROGRESS="0")
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["-m", "kaizen.runtime.cli", "train", "--base", str(base), *ARGS]
    subprocess.run([sys.executable, *common, "--out", str(one)], check=True, env=env, timeout=300,
                   capture_output=True)
    launcher = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(_free_port()), *common, "--out", str(two)],
                          env=env, timeout=300, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["matrix"] == r2["matrix"]
    a = load_file(str(one / "tasks" / "1_hole_count" / "state.safetensors"))
    b = load_file(str(two / "tasks" / "1_hole_count" / "state.safetensors"))
    for k in a:
        rel = np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-12)
        assert rel < 1e-3, (k, rel)
