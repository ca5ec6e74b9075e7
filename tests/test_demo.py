"""`kaizen demo` end to end on a miniature setting: every stage runs for real (pretrain, export,
hub + stations as processes, training with per-task delivery, parts at the stations, report),
the stations agree with the trainer, and no process is left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _processes_in(folder: Path) -> list[int]:
    """Pids whose working directory lies inside `folder`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "cwd").startswith(str(folder)):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def run_demo(work: Path, report: Path, baselines: str, epochs: int = 1) -> subprocess.CompletedProcess:
    """`kaizen demo` in a fresh interpreter on a miniature setting (2 stations, 8 train / 3 test parts)."""
    cmd = [sys.executable, "-m", "kaizen.runtime.cli", "demo", "--work", str(work), "--report", str(report),
           "--stations", "2", "--pretrain-steps", "4", "--clip-steps", "4", "--n-train", "8", "--n-test", "3",
           "--epochs", str(epochs), "--line-parts", "8", "--baselines", baselines]
    env = dict(os.environ, KAIZEN_PROGRESS="0")
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_demo_end_to_end_small(tmp_path):
    work, report = tmp_path / "work", tmp_path / "report"
    proc = run_demo(work, report, "lora_ft")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((report / "report.json").read_text())
    assert data["parts"]["agreement"] == 100.0
    assert data["parts"]["parts"] == 6 * 3
    assert len(data["timeline"]) == 6 and all(len(d["activated_s"]) == 2 for d in data["timeline"])
    assert set(data["metrics"]) == {"kaizen", "lora_ft"}
    for png in ("matrix.png", "metrics.png", "latency.png", "pack_sizes.png", "delivery.png"):
        assert (report / png).stat().st_size > 5000
    text = (report / "report.md").read_text()
    assert "Kaizen Edge demo report" in text and "Base `real-fast`" in text
    ops = data["operations"]  # canary -> promote, fleet rollback, offline install, status page + metrics
    assert ops["canary"]["waiting_before_promote"] and ops["fleet_rollback"]["to_version"] == 1
    assert ops["offline_install"]["hub_shows_local_s"] >= 0 and ops["status_page"]["metrics_lines"] > 10
    assert "Operating the plant" in text and "hub_metrics.txt" in text
    imp = data["improve"]   # drifted parts captured, uploaded, labelled, train --continue, v3 out (v2 was the ops')
    assert imp["line"]["parts"] == imp["line"]["labelled"] == 8 and imp["version"] == 3
    assert imp["train"]["added"]["labelled"] == 8   # every label the operator gave reached the trainer
    assert all(s["pending"] == 0 and s["uploaded"] == s["persisted"] for s in imp["captured"].values())
    assert imp["others"]["answers_changed"] == 0    # other tasks' packs untouched: same answers
    assert "Improvement loop" in text and imp["timeline_s"]["first_capture_to_v2_active"] > 0
    if Path("/usr/bin/chromium").exists():
        assert ops["status_page"]["screenshot"] == "status.png" and (report / "status.png").stat().st_size > 5000
    # no hub/station process outlives the demo (they run with their cwd in WORK/fleet)
    assert not _processes_in(work), "demo left processes behind"


@pytest.mark.slow
def test_demo_second_run_reuses_everything(tmp_path):
    work, report = tmp_path / "work", tmp_path / "report"
    first = run_demo(work, report, "")
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_demo(work, report, "")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "reusing the pretrained real-fast base" in second.stdout and "reusing the base bundle" in second.stdout
    assert "reusing the finished kaizen run" in second.stdout
    # a changed kaizen run (here --epochs) is trained anew: its packs, the fleet that installed the
    # old ones and the later stages go too, so the stations answer with the new packs
    third = run_demo(work, report, "", epochs=2)
    assert third.returncode == 0, third.stdout[-2000:] + third.stderr[-2000:]
    assert "the kaizen run is new or changed: removing" in third.stdout and "training kaizen" in third.stdout
    assert json.loads((report / "report.json").read_text())["parts"]["agreement"] == 100.0


def test_a_new_kaizen_run_forgets_what_the_old_one_made(tmp_path):
    from argparse import Namespace

    from kaizen.trainer.demo.run import DELIVERED, STALE, forget_stale, mark_delivered

    work = tmp_path / "work"
    (work / "fleet" / "stations").mkdir(parents=True)
    (work / "packs").mkdir()
    (work / "packs" / "seal_defect-1.kpk").write_bytes(b"old pack")
    (work / "operations.json").write_text("{}")
    (work / "improve.json").write_text("{}")
    (work / "base-real-fast").mkdir()   # the base and the bundle stay
    args = Namespace(seed=0, n_train=8, n_test=3, epochs=1, base="real-fast")
    mark_delivered(work, work / "base-real-fast", args, "fp-1")
    forget_stale(work, work / "base-real-fast", args, "fp-1")   # the same run delivered them: all kept
    assert all((work / name).exists() for name in ("fleet", "packs", "operations.json", "improve.json"))
    args.epochs = 2   # a changed run (also: none delivered yet, or an interrupted one): all removed
    forget_stale(work, work / "base-real-fast", args, "fp-1")
    assert not any((work / name).exists() for name in STALE)
    assert (work / "base-real-fast").is_dir() and not (work / DELIVERED).exists()


def test_a_rebuilt_base_forgets_the_packs_and_runs_of_the_old_one(tmp_path):
    """Same config, same base path, other weights (a rebuilt or re-aligned base): the packs, the
    fleet and the finished runs were made for the old base and are not reused."""
    from argparse import Namespace

    from kaizen.trainer.compare import _reusable
    from kaizen.trainer.demo.run import STALE, forget_stale, mark_delivered, train_config

    work = tmp_path / "work"
    (work / "packs").mkdir(parents=True)
    args = Namespace(seed=0, n_train=8, n_test=3, epochs=1, base="real-fast")
    mark_delivered(work, work / "base-real-fast", args, "fp-old")
    forget_stale(work, work / "base-real-fast", args, "fp-new")
    assert not any((work / name).exists() for name in STALE)
    cfg = train_config("kaizen", work / "base-real-fast", work, args)
    run = Path(cfg.out)
    run.mkdir(parents=True)
    results = {"config": cfg.to_dict(), "status": "done", "base_fingerprint": "fp-old"}
    (run / "results.json").write_text(json.dumps(results))
    assert _reusable(cfg, run, "fp-old") is not None
    assert _reusable(cfg, run, "fp-new") is None


def test_demo_rebuilds_a_base_made_by_an_older_recipe(tmp_path, monkeypatch):
    """A base in WORK whose kaizen_base.json records another preset recipe (e.g. real-fast before
    its fixed output head) is rebuilt, not reused; today's recipe is reused."""
    from kaizen.trainer.demo import run as demo_run
    from kaizen.trainer.presets import REAL_PRESETS

    base = tmp_path / "base-real-fast"
    base.mkdir()
    built = []
    monkeypatch.setattr("kaizen.trainer.assemble.assemble", lambda preset, out, **kw: built.append(preset))
    monkeypatch.setattr("kaizen.trainer.pretrain.pretrain", lambda *a, **kw: None)
    recipe = json.loads(json.dumps(REAL_PRESETS["real-fast"].to_dict()))
    (base / "kaizen_base.json").write_text(json.dumps({"pretrained": True, "preset": recipe}))
    assert demo_run.ensure_base(tmp_path, 1, 1) == base and built == []
    older = dict(recipe, fixed_head=False)
    (base / "kaizen_base.json").write_text(json.dumps({"pretrained": True, "preset": older}))
    demo_run.ensure_base(tmp_path, 1, 1)
    assert built == ["real-fast"]
