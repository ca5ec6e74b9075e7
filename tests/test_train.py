"""`kaizen train` / `kaizen eval` end to end on a 2-task tiny stream (random-init tiny base).

Covers: the CLI writes results.json / results.md / matrix.png and per-task checkpoints; the
metrics of a run agree with its matrix; a run stopped after task 0 and resumed equals an
uninterrupted run; `kaizen eval --run` reproduces the matrix; config mismatches are refused.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from kaizen.runtime.cli import main as kaizen
from kaizen.runtime.errors import ConfigError
from kaizen.trainer.bases import init_base
from kaizen.trainer.metrics import summarize
from kaizen.trainer.train import Session, TrainConfig, train

ARGS = ["--n-train", "8", "--n-test", "4", "--max-tasks", "2", "--epochs", "1", "--batch-size", "4",
        "--threads", "1"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return init_base("tiny-llama", tmp_path_factory.mktemp("base") / "b", seed=0)


def cfg(base_dir, out, **kw):
    d = {"base": str(base_dir), "out": str(out), "method": "kaizen", "n_train": 8, "n_test": 4, "max_tasks": 2, "epochs": 1,
             "batch_size": 4, "threads": 1}
    d.update(kw)
    return TrainConfig(**d)


def test_train_cli_end_to_end(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert kaizen(["train", "--method", "kaizen", "--base", str(base_dir), "--out", str(out), *ARGS]) == 0
    assert "MFN" in capsys.readouterr().out
    for name in ("results.json", "results.md", "matrix.png", "run.json"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert res["stream"] == ["seal_defect", "hole_count"] and res["status"] == "done"
    assert len(res["matrix"]) == 2 and all(len(r) == 2 for r in res["matrix"])  # full matrix
    # metrics are those of the matrix
    assert res["metrics"] == pytest.approx(summarize(res["matrix"]))
    a = np.array(res["matrix"])
    assert res["metrics"]["MFN"] == pytest.approx(a[1].mean())
    assert res["metrics"]["BWT"] == pytest.approx(a[1, 0] - a[0, 0])
    assert 0 <= res["selection_final"] <= 100 and len(res["selection"]) == 2
    assert res["trainable_params_per_task"][0] == 640 + 64 + 19456
    assert res["pack_bytes_per_task"][0] == 4 * (640 + 64 + 19456)
    assert all(s > 0 for s in res["train_seconds_per_task"]) and res["infer_ms_per_sample"] > 0
    pack = load_file(str(out / "tasks" / "1_hole_count" / "pack.safetensors"))
    assert pack["prompt"].shape == (10, 64) and pack["key"].shape == (64,) and "lora.0.q_proj.A" in pack
    assert pack["text_emb"].shape == (6, 64)  # the task's 6 train phrasings, CLIP text space
    np.testing.assert_allclose(np.linalg.norm(pack["text_emb"], axis=1), 1, atol=1e-5)
    assert "| seal_defect |" in (out / "results.md").read_text()


def test_resume_after_interruption_equals_uninterrupted(base_dir, tmp_path):
    full = train(cfg(base_dir, tmp_path / "full", method="replay", options={"replay_size": 3}))
    assert train(cfg(base_dir, tmp_path / "cut", method="replay", options={"replay_size": 3}), stop_after=0) is None
    state = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert len(state["rows"]) == 1 and not (tmp_path / "cut" / "results.json").exists()
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg(base_dir, tmp_path / "cut", method="replay", options={"replay_size": 3}))
    with pytest.raises(ConfigError, match="lr"):
        train(cfg(base_dir, tmp_path / "cut", method="replay", options={"replay_size": 3}, lr=0.1), resume=True)
    resumed = train(cfg(base_dir, tmp_path / "cut", method="replay", options={"replay_size": 3}), resume=True)
    assert resumed["matrix"] == full["matrix"]
    a = load_file(str(tmp_path / "full" / "tasks" / "1_hole_count" / "state.safetensors"))
    b = load_file(str(tmp_path / "cut" / "tasks" / "1_hole_count" / "state.safetensors"))
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


def test_a_run_on_another_base_is_not_resumed_or_continued(base_dir, tmp_path):
    """run.json records the base fingerprint; a run whose base was since rebuilt, re-aligned or
    re-whitened at the same path is refused (its prompts, keys and LoRA fit the old weights)."""
    assert train(cfg(base_dir, tmp_path / "cut", method="lora_ft"), stop_after=0) is None
    state_path = tmp_path / "cut" / "run.json"
    state = json.loads(state_path.read_text())
    state["base_fingerprint"] = "0" * 64  # what the run would say had the base changed since
    state_path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="trained on another base.*train a new run"):
        train(cfg(base_dir, tmp_path / "cut", method="lora_ft"), resume=True)
    with pytest.raises(ConfigError, match="trained on another base"):
        Session.from_run(tmp_path / "cut")


def test_a_base_from_an_older_recipe_is_named_when_training_starts(base_dir, tmp_path, capsys):
    """recipe_drift names the preset fields a base was built without; training warns, and trains."""
    from kaizen.trainer.presets import recipe_drift

    info = json.loads((base_dir / "kaizen_base.json").read_text())
    assert recipe_drift(info["preset"]) == []
    assert recipe_drift({"name": "someone-elses-llava"}) == []  # not a built-in preset: nothing to say
    fast = {"name": "real-fast", "lm": "tiny", "image_size": 112, "train_lm": True}  # fields of an older base
    assert "fixed_head" in recipe_drift(fast)
    old = tmp_path / "old-base"
    shutil.copytree(base_dir, old)
    info["preset"]["vocab_size"] = info["preset"]["vocab_size"] + 1  # as if today's recipe had changed
    (old / "kaizen_base.json").write_text(json.dumps(info))
    assert train(cfg(old, tmp_path / "run", method="lora_ft"), stop_after=0) is None
    err = capsys.readouterr().err
    assert "older recipe of preset tiny-llama (differs in: vocab_size)" in err


def test_resume_via_cli_and_eval_reproduces_matrix(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--method", "modalprompt", "--base", str(base_dir), "--out", str(out), *ARGS]
    assert kaizen(base + ["--stop-after", "0"]) == 3
    assert kaizen(base + ["--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert kaizen(["eval", "--run", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["matrix"] == res["matrix"] and again["selection"] == res["selection"]
    assert kaizen(["eval", "--run", str(tmp_path / "nothing")]) == 1
    assert "is not a training run folder" in capsys.readouterr().err


def test_bad_options_are_refused(base_dir, tmp_path):
    with pytest.raises(ConfigError, match="is unknown"):
        cfg(base_dir, tmp_path / "x", method="nope")
    with pytest.raises(ConfigError, match="unknown method option"):
        cfg(base_dir, tmp_path / "x", options={"topk": 3})
    with pytest.raises(ConfigError, match="lora_targets"):
        cfg(base_dir, tmp_path / "x", options={"lora_targets": ["qq_proj"]})


def test_compare_writes_mean_and_spread_over_seeds(base_dir, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora_ft,zeroshot", "--seeds", "0,1", "--base", str(base_dir),
            "--out", str(out), *ARGS]
    assert kaizen(argv) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["methods"]) == {"lora_ft", "zeroshot"}
    stats = summary["methods"]["lora_ft"]["MFN"]
    per_seed = [r["MFN"] for r in summary["per_seed"]["lora_ft"]]
    assert stats["n"] == 2 and stats["mean"] == pytest.approx(np.mean(per_seed))
    assert stats["min"] == min(per_seed) and stats["max"] == max(per_seed)
    assert (out / "runs" / "lora_ft" / "seed1" / "matrix.png").exists()
    assert "| lora_ft |" in (out / "compare.md").read_text()
    stamp = (out / "runs" / "lora_ft" / "seed0" / "results.json").stat().st_mtime_ns
    assert kaizen(argv) == 0  # finished runs are reused, not retrained
    assert (out / "runs" / "lora_ft" / "seed0" / "results.json").stat().st_mtime_ns == stamp
    assert kaizen(["compare", "--methods", "nope", "--base", str(base_dir), "--out", str(out)]) == 1
