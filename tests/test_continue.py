"""`kaizen train --continue` (trainer/continue_run.py) on a 3-task tiny run.

Covers: the next version of one task's pack from drifted, labelled samples (version N+1, other
tasks' pack files byte-identical, the task's key frozen, its prompt and LoRA trained on old + new
data, unlabelled records skipped and counted, a deterministic hold-out), a second continue of the
continue run (version N+2, earlier added data kept), `--new-task` from labelled samples, export of
the continue run as a signed pack of version N+1 that verifies, and the typed errors for bad data.
The random-init tiny base cannot learn the drifted parts, so accuracy gains are measured on the
demo's real base (see the module docstring of continue_run.py and the report), not asserted here.
"""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from kaizen.export.pack_export import export_pack, find_task_dir
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.cli import main as kaizen
from kaizen.runtime.errors import ConfigError
from kaizen.runtime.keys import TrustedKeys
from kaizen.runtime.pack import verify_pack
from kaizen.trainer.continue_run import ContinueConfig, continue_run, replay_factor
from kaizen.trainer.data.added import split_holdout
from kaizen.trainer.data.drift import drifted_samples, write_llava_json
from kaizen.trainer.data.types import DataError
from kaizen.trainer.train import Shared, TrainConfig, train

TASK = "seal_defect"
OTHERS = ("1_hole_count", "2_cable_color")
PACK_FILES = ("pack.safetensors", "pack_meta.json", "task.json", "golden/0.png")


@pytest.fixture(scope="module")
def shared(tiny_llama):
    return Shared(str(tiny_llama[0]))


@pytest.fixture(scope="module")
def run(tiny_llama, shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("cont") / "run"
    train(TrainConfig(base=str(tiny_llama[0]), out=str(out), n_train=8, n_test=4, max_tasks=3, epochs=1,
                      batch_size=4), shared=shared)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 drifted seal parts (new supplier) as the hub exports them; the last 2 not labelled yet."""
    return write_llava_json(drifted_samples(TASK, "supplier", "train", 0, 12), tmp_path_factory.mktemp("add"),
                            unlabelled=2)


@pytest.fixture(scope="module")
def v2(run, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2") / "seal-v2"
    assert kaizen(["train", "--continue", str(run), "--task", TASK, "--add", str(data), "--out", str(out),
                   "--epochs", "3"]) == 0
    return out


def test_continue_writes_version_n_plus_1_and_leaves_other_tasks_alone(run, v2):
    report = json.loads((v2 / "continue.json").read_text())
    assert report["version"] == 2 and report["parent_version"] == 1 and report["task"] == TASK
    added = report["added"]
    assert (added["labelled"], added["unlabelled_skipped"], added["train"], added["heldout"]) == (10, 2, 8, 2)
    assert report["train"]["samples"] == 8 + 8  # the run's 8 old train parts + 8 added ones
    assert report["train"]["replay"] == 1   # auto: 8 old parts already weigh as much as 8 added ones
    assert report["train"]["steps"] == 3 * 4 and report["train"]["loss_last"] < report["train"]["loss_first"]
    assert set(report["before"]["others"]) == {"hole_count", "cable_color"}
    assert report["before"]["heldout"] is not None and report["after"]["heldout"] is not None
    state = json.loads((v2 / "run.json").read_text())
    assert state["versions"] == {"seal_defect": 2, "hole_count": 1, "cable_color": 1}
    for d in OTHERS:  # other tasks' packs are not re-exported: byte-identical files
        for name in PACK_FILES:
            assert (v2 / "tasks" / d / name).read_bytes() == (run / "tasks" / d / name).read_bytes(), (d, name)
    old = load_file(str(run / "tasks" / "0_seal_defect" / "pack.safetensors"))
    new = load_file(str(v2 / "tasks" / "0_seal_defect" / "pack.safetensors"))
    assert set(old) == set(new)
    np.testing.assert_array_equal(old["key"], new["key"])  # only the LoRA trains by default
    np.testing.assert_array_equal(old["prompt"], new["prompt"])
    assert any(not np.array_equal(old[k], new[k]) for k in old if k.startswith("lora."))
    assert report["others_unchanged"] and report["train"]["trained"] == ["lora"]
    assert report["before"]["others"] == report["after"]["others"]
    meta = json.loads((v2 / "tasks" / "0_seal_defect" / "pack_meta.json").read_text())
    assert meta["version"] == 2 and meta["metrics"]["accuracy_before"] == report["before"]["test"]
    assert meta["metrics"]["heldout_accuracy_after"] == report["after"]["heldout"]


def test_export_of_the_continue_run_is_version_n_plus_1_and_verifies(v2, tiny_llama, signing_key, tmp_path):
    bundle = Bundle.open(tiny_llama[1])
    manifest = export_pack(find_task_dir(v2, TASK), tmp_path / "seal-2.kpk", bundle=bundle, signing_key=signing_key)
    assert manifest.version == 2
    trusted = TrustedKeys([])
    trusted.add(signing_key)
    got = verify_pack(tmp_path / "seal-2.kpk", trusted, base_fingerprint=bundle.fingerprint)
    assert got.version == 2 and got.metrics["accuracy_before"] is not None
    other = export_pack(find_task_dir(v2, "hole_count"), tmp_path / "holes.kpk", bundle=bundle, signing_key=signing_key)
    assert other.version == 1  # untouched tasks keep their version


def test_continue_of_a_continue_run_keeps_old_and_added_data(v2, data, shared, tmp_path):
    report = continue_run(ContinueConfig(run=str(v2), add=str(data), task=TASK, out=str(tmp_path / "v3"),
                                         epochs=1, train="prompt,lora", replay=2), shared=shared)
    assert report["version"] == 3 and report["parent_version"] == 2
    # old data = the stream's 8 + v2's 8 added, replayed twice as asked, + this file's 8 again
    assert report["train"]["samples"] == 2 * (8 + 8) + 8 and report["train"]["replay"] == 2
    old = load_file(str(v2 / "tasks" / "0_seal_defect" / "pack.safetensors"))
    new = load_file(str(tmp_path / "v3" / "tasks" / "0_seal_defect" / "pack.safetensors"))
    assert not np.array_equal(old["prompt"], new["prompt"])  # asked for: the prompt trains too
    np.testing.assert_array_equal(old["key"], new["key"])
    for d in ("1_hole_count", "2_cable_color"):
        assert (tmp_path / "v3" / "tasks" / d / "pack.safetensors").read_bytes() == \
            (v2 / "tasks" / d / "pack.safetensors").read_bytes()


def test_new_task_from_labelled_samples(run, shared, tmp_path, tiny_llama, signing_key):
    parts = write_llava_json(drifted_samples("label_orientation", "lighting", "train", 0, 12), tmp_path / "add")
    out = tmp_path / "new"
    report = continue_run(ContinueConfig(run=str(run), add=str(parts), new_task="label_turn", out=str(out),
                                         epochs=1), shared=shared)
    assert report["kind"] == "new_task" and report["version"] == 1 and report["after"]["heldout"] is None
    assert report["after"]["test"] is not None and report["added"]["heldout"] == 3
    state = json.loads((out / "run.json").read_text())
    assert state["stream"][-1] == "label_turn" and len(state["rows"]) == 4
    meta = json.loads((out / "tasks" / "3_label_turn" / "pack_meta.json").read_text())
    assert meta["answers"] == ["down", "left", "right", "up"]
    m = export_pack(find_task_dir(out, "label_turn"), tmp_path / "lt.kpk", bundle=Bundle.open(tiny_llama[1]),
                    signing_key=signing_key)
    assert m.version == 1 and m.task_id == "label_turn"
    again = continue_run(ContinueConfig(run=str(out), add=str(parts), task="label_turn", out=str(tmp_path / "lt2"),
                                        epochs=1), shared=shared)
    assert again["version"] == 2  # a new task can be continued like any other
    assert kaizen(["eval", "--run", str(out)]) == 0  # re-evaluation rebuilds the added task too
    results = json.loads((out / "results.json").read_text())
    assert len(results["matrix"]) == 4 and len(results["matrix"][-1]) == 4


def _write(path, records):
    path.write_text(json.dumps(records))
    return path


def test_bad_added_data_is_refused_with_the_file_and_record(run, data, shared, tmp_path):
    def go(add, **kw):
        return continue_run(ContinueConfig(run=str(run), add=str(add), out=str(tmp_path / "x"),
                                           **{"task": TASK, **kw}), shared=shared)

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not valid JSON"):
        go(tmp_path / "bad.json")
    records = json.loads(data.read_text())
    for r in records:
        r["conversations"][1]["value"] = ""
    with pytest.raises(DataError, match="no labelled record \\(12 unlabelled skipped\\)"):
        go(_write(data.parent / "none.json", records))
    records[0]["conversations"][1]["value"] = "maybe"
    with pytest.raises(DataError, match="record #0.*'maybe' is not in task 'seal_defect'"):
        go(_write(data.parent / "wrong.json", records))
    records[0]["conversations"][1]["value"] = "yes"
    records[0]["image"] = "images/missing.png"
    with pytest.raises(DataError, match="record #0.*missing.png does not exist"):
        go(_write(data.parent / "gone.json", records))
    with pytest.raises(ConfigError, match="'nope' is not in"):
        go(data, task="nope")
    with pytest.raises(ConfigError, match="already exists"):
        go(data, task="", new_task="hole_count")
    with pytest.raises(ConfigError, match="--train"):
        go(data, train="prompt,everything")
    with pytest.raises(ConfigError, match="a task id is lower-case"):
        go(data, task="", new_task="Bad Name")
    with pytest.raises(ConfigError, match="exactly one of"):
        ContinueConfig(run=str(run), add=str(data))


def test_auto_replay_weighs_old_data_at_least_as_much_as_the_added_data():
    assert replay_factor(160, 300) == 2 and replay_factor(160, 160) == 1 and replay_factor(160, 40) == 1
    assert replay_factor(8, 20) == 3 and replay_factor(0, 5) == 5
    with pytest.raises(ConfigError, match="--replay"):
        ContinueConfig(run="r", add="a.json", task=TASK, replay=-1)


def test_holdout_is_deterministic_and_independent_of_record_order():
    items = [(f"id{i}", i) for i in range(20)]
    _, held_a = split_holdout(items, 0.25, seed=0)
    _, held_b = split_holdout(list(reversed(items)), 0.25, seed=0)
    assert len(held_a) == 5 and {i for i, _ in held_a} == {i for i, _ in held_b}
    assert {i for i, _ in split_holdout(items, 0.25, seed=1)[1]} != {i for i, _ in held_a}
    assert len(split_holdout(items[:2], 0.1, seed=0)[1]) == 1  # at least one held back, one trained


def test_top_k_1_run_trains_prompt_and_lora_by_default_and_leaves_other_tasks_alone(tiny_llama, shared, data,
                                                                                     tmp_path):
    """With top_k 1 a part is answered by its selected pack alone, so the default --train adds T's
    prompt (measured better on drift, README); other tasks' answers stay bit-identical."""
    run1 = tmp_path / "run-k1"
    train(TrainConfig(base=str(tiny_llama[0]), out=str(run1), n_train=8, n_test=4, max_tasks=3, epochs=1,
                      batch_size=4, options={"top_k": 1}), shared=shared)
    report = continue_run(ContinueConfig(run=str(run1), add=str(data), task=TASK, out=str(tmp_path / "v2"),
                                         epochs=2), shared=shared)
    assert report["train"]["trained"] == ["prompt", "lora"]
    old = load_file(str(run1 / "tasks" / "0_seal_defect" / "pack.safetensors"))
    new = load_file(str(tmp_path / "v2" / "tasks" / "0_seal_defect" / "pack.safetensors"))
    np.testing.assert_array_equal(old["key"], new["key"])
    assert not np.array_equal(old["prompt"], new["prompt"])
    assert report["others_unchanged"] and report["before"]["others"] == report["after"]["others"]
    assert json.loads((tmp_path / "v2" / "tasks" / "0_seal_defect" / "pack_meta.json").read_text())[
        "metrics"]["fusion_top_k"] == 1


def test_continue_of_a_prompt_net_run_retrains_the_meta_net_at_a_third_of_the_lr(tiny_llama, shared, data,
                                                                                 tmp_path):
    """A top_k-1 run with image-conditioned prompts: --task trains T's prompt, its meta-net and its
    LoRA at a third of the run's lr (default_lr, measured in README); key and other tasks unchanged."""
    run1 = tmp_path / "run-net"
    train(TrainConfig(base=str(tiny_llama[0]), out=str(run1), n_train=8, n_test=4, max_tasks=3, epochs=1,
                      batch_size=4, options={"top_k": 1, "prompt_net": 4}), shared=shared)
    report = continue_run(ContinueConfig(run=str(run1), add=str(data), task=TASK, out=str(tmp_path / "v2"),
                                         epochs=2), shared=shared)
    assert report["train"]["trained"] == ["prompt", "lora"] and report["train"]["lr"] == pytest.approx(1e-3)
    old = load_file(str(run1 / "tasks" / "0_seal_defect" / "pack.safetensors"))
    new = load_file(str(tmp_path / "v2" / "tasks" / "0_seal_defect" / "pack.safetensors"))
    np.testing.assert_array_equal(old["key"], new["key"])
    assert not np.array_equal(old["prompt_net.W2"], new["prompt_net.W2"])
    assert new["prompt_net.W1"].shape[0] == 4 and new["prompt_net.W2"].shape[1] == 4
    assert report["others_unchanged"] and report["before"]["others"] == report["after"]["others"]
    explicit = continue_run(ContinueConfig(run=str(run1), add=str(data), task=TASK, out=str(tmp_path / "v2b"),
                                           epochs=1, lr=2e-3), shared=shared)
    assert explicit["train"]["lr"] == pytest.approx(2e-3)
