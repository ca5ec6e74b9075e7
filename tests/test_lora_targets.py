"""LoRA targets are data of the base: preset -> kaizen_base.json -> bundle -> training -> pack -> station.

A tiny base whose preset declares attention-only targets (`tiny-attn`, registered for this module)
is initialised, exported and trained; its bundle's decoder takes attention LoRA inputs only, the
run's packs carry those arrays only, and a Station installs them (golden probe) and answers exactly
as the trainer. Also: an explicit lora_targets option wins (narrower than the base) or is refused
(outside the base); `kaizen base export --lora-targets` overrides the base; a pack naming a target
the bundle's decoder lacks is refused by name, at export and at install; a pack with fewer targets
than the bundle works (missing LoRA inputs are zeros); old bases without the field keep all 7.

    .venv/bin/python -m pytest -q tests/test_lora_targets.py
"""

import io
import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from kaizen.export.base_export import export_bundle
from kaizen.export.loading import load_base
from kaizen.export.lora_targets import ALL_TARGETS, ATTENTION_TARGETS, base_lora_targets
from kaizen.export.pack_export import export_pack, find_task_dir
from kaizen.export.wrappers import ATTN_TARGETS, DEFAULT_TARGETS
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.cli import main as kaizen
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import ConfigError, PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack import build_pack, read_pack
from kaizen.runtime.pack_arrays import lora_targets_of
from kaizen.runtime.station import Station
from kaizen.trainer.bases import init_base
from kaizen.trainer.methods import MethodConfig
from kaizen.trainer.presets import PRESETS
from kaizen.trainer.train import Shared, TrainConfig, train

MLP = ("gate_proj", "up_proj", "down_proj")


def _targets(names) -> set[str]:
    return set(lora_targets_of(names))


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _cfg(base, out, **kw) -> TrainConfig:
    d = dict(base=str(base), out=str(out), method="kaizen", n_train=8, n_test=4, max_tasks=2, epochs=1,
             batch_size=4, threads=1)
    return TrainConfig(**{**d, **kw})


@pytest.fixture(scope="module")
def attn(tmp_path_factory):
    """(base_dir, bundle_dir) of a tiny base whose preset declares attention-only LoRA targets."""
    PRESETS["tiny-attn"] = replace(PRESETS["tiny-llama"], name="tiny-attn", lora_targets=ATTENTION_TARGETS)
    try:
        root = tmp_path_factory.mktemp("attn")
        base = init_base("tiny-attn", root / "base", seed=0)
    finally:
        del PRESETS["tiny-attn"]
    bundle = root / "bundle"
    export_bundle(base, bundle, log=lambda *_: None)  # no targets given: the base's
    return base, bundle


@pytest.fixture(scope="module")
def attn_run(attn, tmp_path_factory):
    base, _ = attn
    run = tmp_path_factory.mktemp("attn_run") / "run"
    shared = Shared(str(base))
    cfg = _cfg(base, run)
    return run, train(cfg, shared=shared), shared.stream(cfg)


def test_presets_declare_their_targets():
    assert ALL_TARGETS == tuple(DEFAULT_TARGETS) and ATTENTION_TARGETS == tuple(ATTN_TARGETS)
    assert PRESETS["small"].lora_targets == ATTENTION_TARGETS == PRESETS["medium"].lora_targets
    assert PRESETS["tiny-llama"].lora_targets == ALL_TARGETS == PRESETS["tiny-qwen2"].lora_targets
    with pytest.raises(ConfigError, match="qq_proj"):
        replace(PRESETS["small"], lora_targets=("qq_proj",))


def test_base_targets_flow_to_bundle_training_pack_and_station(attn, attn_run, tmp_path):
    base, bundle_dir = attn
    assert json.loads((base / "kaizen_base.json").read_text())["lora"] == {"targets": list(ATTENTION_TARGETS)}
    bundle = Bundle.open(bundle_dir)
    assert bundle.meta["lora"]["targets"] == list(ATTENTION_TARGETS)
    graph = onnx.load(str(bundle_dir / "decoder.onnx"), load_external_data=False).graph
    inputs = [i.name for i in graph.input if i.name.startswith("lora.")]  # optional (zero default) inputs
    assert _targets(inputs) == set(ATTENTION_TARGETS) and set(inputs) == set(bundle.lora_shapes())
    run, results, tasks = attn_run
    key = generate_signing_key()
    station = Station(bundle_dir, tmp_path / "store", TrustedKeys([key.public_key()]), threshold=-1.0, top_k=3)
    for task_id in results["stream"]:
        arrays = load_file(str(find_task_dir(run, task_id) / "pack.safetensors"))
        assert _targets(k for k in arrays if k.startswith("lora.")) == set(ATTENTION_TARGETS)
        export_pack(find_task_dir(run, task_id), tmp_path / f"{task_id}.kpk", bundle=bundle, signing_key=key)
        pack = read_pack(tmp_path / f"{task_id}.kpk", TrustedKeys([key.public_key()]))
        assert set(pack.lora) == {k for k in arrays if k.startswith("lora.")}
        station.install(tmp_path / f"{task_id}.kpk")  # golden probe: the station answers as the trainer
    predictions = json.loads((run / "predictions.json").read_text())
    for task in tasks:
        got = station.infer_batch([_png(s.load_image()) for s in task.test], [s.instruction for s in task.test])
        for i, r in enumerate(got):
            want = predictions[f"{task.task_id}/{i}"]
            assert (r["answer"], r["task_id"]) == (want["answer"], want["selected"])
    station.close()
    # attention-only packs are smaller than the same run's all-7 arrays would be (the point of it)
    # prompt 640 + key 64 + rank-8 q, k, v, o on 2 layers (7,168; all 7 targets would be 19,456)
    assert results["trainable_params_per_task"][0] == 640 + 64 + 7168


def test_explicit_targets_win_when_within_the_base(attn, tmp_path):
    base, _ = attn
    run = tmp_path / "run"
    train(_cfg(base, run, max_tasks=1, options={"lora_targets": ["q_proj", "v_proj"]}))
    arrays = load_file(str(find_task_dir(run, "seal_defect") / "pack.safetensors"))
    assert _targets(k for k in arrays if k.startswith("lora.")) == {"q_proj", "v_proj"}


def test_targets_outside_the_base_are_refused_with_what_to_do(attn, tmp_path):
    base, _ = attn
    with pytest.raises(ConfigError, match=r"gate_proj.*q_proj', 'k_proj', 'v_proj', 'o_proj'.*lora_targets"):
        train(_cfg(base, tmp_path / "run", max_tasks=1, options={"lora_targets": ["q_proj", "gate_proj"]}))


def test_old_base_without_the_field_keeps_all_seven(tmp_path):
    base = init_base("tiny-llama", tmp_path / "old", seed=0)
    info = json.loads((base / "kaizen_base.json").read_text())
    del info["lora"]
    info["preset"].pop("lora_targets")  # exactly what bases made before targets were data hold
    (base / "kaizen_base.json").write_text(json.dumps(info))
    assert base_lora_targets(info) == ALL_TARGETS
    assert MethodConfig().for_base(load_base(base)).lora_targets == ALL_TARGETS
    with pytest.raises(ConfigError, match="lora.targets"):
        base_lora_targets({"lora": {"targets": ["qq_proj"]}})


def test_export_cli_overrides_the_base_targets(attn, tmp_path, capsys):
    base, _ = attn
    out = tmp_path / "qv"
    assert kaizen(["base", "export", str(base), "--out", str(out), "--lora-targets", "q_proj,v_proj",
                   "--no-check"]) == 0
    meta = json.loads((out / "base.json").read_text())
    assert meta["lora"]["targets"] == ["q_proj", "v_proj"] and _targets(meta["lora"]["shapes"]) == {"q_proj", "v_proj"}
    assert kaizen(["base", "export", str(base), "--out", str(tmp_path / "bad"), "--lora-targets", "qq_proj"]) == 1
    assert "qq_proj" in capsys.readouterr().err


def test_pack_naming_a_target_the_bundle_lacks_is_refused(attn, attn_run, tmp_path):
    _, bundle_dir = attn
    run, results, _ = attn_run
    bundle = Bundle.open(bundle_dir)
    key = generate_signing_key()
    task = tmp_path / "task"
    shutil.copytree(find_task_dir(run, results["stream"][0]), task / "tasks" / "0_x")
    arrays = load_file(str(task / "tasks" / "0_x" / "pack.safetensors"))
    arrays["lora.0.gate_proj.A"] = np.zeros((8, 64), np.float32)  # as if trained with an MLP target
    arrays["lora.0.gate_proj.B"] = np.zeros((192, 8), np.float32)
    save_file(arrays, str(task / "tasks" / "0_x" / "pack.safetensors"))
    with pytest.raises(PackError, match=r"\['gate_proj'\].*no input in this bundle's decoder"):
        export_pack(task / "tasks" / "0_x", tmp_path / "x.kpk", bundle=bundle, signing_key=key)
    # the same arrays in a signed pack reach a station: refused at install, naming the input
    pack = read_pack(_exported(run, results, bundle, key, tmp_path), TrustedKeys([key.public_key()]))
    lora = {**pack.lora, "lora.0.gate_proj.A": arrays["lora.0.gate_proj.A"],
            "lora.0.gate_proj.B": arrays["lora.0.gate_proj.B"]}
    bad = tmp_path / "bad.kpk"
    build_pack(bad, task_id="bad", version=1, method="kaizen", base_fingerprint=bundle.fingerprint,
               prompt=pack.prompt, key=pack.key, text_emb=pack.text_emb, lora=lora,
               instructions=pack.manifest.instructions, answers=pack.answers, signing_key=key)
    station = Station(bundle_dir, tmp_path / "store", TrustedKeys([key.public_key()]))
    with pytest.raises(PackError, match="gate_proj"):
        station.install(bad)
    assert station.installed() == []
    station.close()


def _exported(run, results, bundle, key, tmp_path):
    out = tmp_path / "good.kpk"
    export_pack(find_task_dir(run, results["stream"][0]), out, bundle=bundle, signing_key=key)
    return out


def test_fewer_targets_than_the_bundle_default_to_zero(tiny_llama):
    """A pack with attention arrays only on an all-7 bundle answers exactly as one whose MLP arrays are zeros."""
    engine = Engine(Bundle.open(tiny_llama[1]))
    assert _targets(engine.lora_shapes) == set(ALL_TARGETS)
    rng = np.random.default_rng(0)
    attn_only = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in engine.lora_shapes.items()
                 if _targets([n]) <= set(ATTENTION_TARGETS)}
    zeros = {n: np.zeros(s, np.float32) for n, s in engine.lora_shapes.items() if n not in attn_only}
    img = [np.full((64, 64, 3), 128, np.uint8)]
    probs = [engine.score_answers(img, ["Is the seal torn?"], ["yes", "no", "maybe"], lora=lora)[0].probs
             for lora in (attn_only, {**attn_only, **zeros}, {})]
    assert probs[0] == probs[1]
    assert max(abs(probs[0][a] - probs[2][a]) for a in probs[0]) > 1e-4  # the attention LoRA does act
