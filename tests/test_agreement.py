"""The Station answers exactly as the trainer: train `kaizen` on a 3-task stream, export every
task as a signed pack, install them all in a Station (ONNX Runtime, no torch) and compare every
test sample's answer and selected task with the trainer's own final predictions, on both tiny
bases and on the real-fast base (DINOv2 vision tower, unaligned query encoders, schema-2 packs),
with static prompts (one pack per part, the base's top_k) and with image-conditioned prompts
(`prompt_net`, fused over the top 3 packs) on real-fast, and (slow) on real-small with its own
defaults (SmolLM2-135M, prompt nets); the station fuses as the packs say.
Also covers `kaizen export pack` and `kaizen infer` from the shell."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from kaizen.export.pack_export import export_pack, find_task_dir
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.cli import main as kaizen
from kaizen.runtime.keys import TrustedKeys, generate_signing_key, save_signing_key
from kaizen.runtime.station import Station
from kaizen.trainer.train import Shared, TrainConfig, train

# Options over the base's own defaults (real-fast declares top_k 1 + prompt_net 16): static prompts
# one pack per part, and conditioned prompts fused over the top 3 packs.
VARIANTS = {"tiny-llama": {}, "tiny-qwen2": {}, "real-fast": {"prompt_net": 0},
            "real-fast+prompt_net": {"prompt_net": 8, "top_k": 3}}


# real-small (SmolLM2-135M, 30 layers): the same check, slow (`make test-slow`, ~6 minutes).
PARAMS = [*VARIANTS, pytest.param("real-small", marks=pytest.mark.slow)]
VARIANTS["real-small"] = {}


@pytest.fixture(scope="module", params=PARAMS)
def trained(request, tmp_path_factory):
    name = request.param.partition("+")[0]
    base_dir, bundle_dir = request.getfixturevalue(name.replace("-", "_"))
    run = tmp_path_factory.mktemp("agree") / request.param
    cfg = TrainConfig(base=str(base_dir), out=str(run), method="kaizen", n_train=12, n_test=6, max_tasks=3,
                      epochs=2, batch_size=6, threads=1, options=VARIANTS[request.param])
    shared = Shared(str(base_dir))
    results = train(cfg, shared=shared)
    return run, bundle_dir, results, shared.stream(cfg)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_station_reproduces_the_trainer_on_every_test_sample(trained, tmp_path):
    run, bundle_dir, results, tasks = trained
    key = generate_signing_key()
    bundle = Bundle.open(bundle_dir)
    station = Station(bundle_dir, tmp_path / "store", TrustedKeys([key.public_key()]), threshold=-1.0)  # fuses as trained
    for t, task_id in enumerate(results["stream"]):
        m = export_pack(find_task_dir(run, task_id), tmp_path / f"{task_id}-1.kpk", bundle=bundle, signing_key=key)
        assert m.schema_version == (1 if bundle.query["kind"] == "clip" else 2)
        station.install(tmp_path / f"{task_id}-1.kpk")  # includes the golden probe: station == trainer
    predictions = json.loads((run / "predictions.json").read_text())
    mismatches = []
    for task in tasks:
        images = [s.load_image() for s in task.test]
        got = station.infer_batch([_png(a) for a in images], [s.instruction for s in task.test])
        for i, r in enumerate(got):
            want = predictions[f"{task.task_id}/{i}"]
            if (r["answer"], r["task_id"]) != (want["answer"], want["selected"]):
                mismatches.append((task.task_id, i, r["answer"], r["task_id"], want))
    station.close()
    assert not mismatches, mismatches[:5]
    assert len(predictions) == sum(len(t.test) for t in tasks)


def test_export_pack_and_infer_from_the_shell(trained, tmp_path, capsys):
    run, bundle_dir, results, tasks = trained
    priv, pub = save_signing_key(generate_signing_key(), tmp_path / "keys", "signer")
    task_id = results["stream"][1]
    out = tmp_path / f"{task_id}-1.kpk"
    assert kaizen(["export", "pack", str(run), task_id, "--bundle", str(bundle_dir), "--key", str(priv),
                   "--out", str(out)]) == 0
    assert kaizen(["pack", "verify", str(out), "--trust", str(pub)]) == 0
    station = Station(bundle_dir, tmp_path / "store", TrustedKeys.from_paths([pub]))
    station.install(out)
    station.close()
    img = tmp_path / "part.png"
    img.write_bytes(_png(tasks[1].test[0].load_image()))
    capsys.readouterr()
    code = kaizen(["infer", "--bundle", str(bundle_dir), "--packs", str(tmp_path / "store"), "--trust", str(pub),
                   "--image", str(img), "--ask", tasks[1].test[0].instruction, "--json", "--threshold", "-1"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["task_id"] == task_id and result["answer"] in tasks[1].answers


def test_pack_of_another_run_base_is_refused(trained, tmp_path, tiny_qwen2, tiny_llama):
    run, bundle_dir, results, _ = trained
    other = tiny_qwen2[1] if bundle_dir == tiny_llama[1] else tiny_llama[1]
    from kaizen.runtime.errors import PackError

    with pytest.raises(PackError, match="was trained on base"):
        export_pack(find_task_dir(run, results["stream"][0]), tmp_path / "x.kpk", bundle=Bundle.open(other),
                    signing_key=generate_signing_key())
    assert np.isfinite(results["metrics"]["MFN"])
