"""The Station: install with probe, dual-modality selection, no-match, explicit task, batching,
threads while packs install and roll back."""

import json
import threading

import numpy as np
import pytest

from kaizen.export.parity import fixed_images
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import InputError, PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack import build_pack
from kaizen.runtime.pack_arrays import GoldenSample
from kaizen.runtime.preprocess import load_rgb
from kaizen.runtime.station import Station
from kaizen.runtime.testpacks import tiny_png

ANSWERS = ["yes", "no", "three"]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(Bundle.open(tiny_llama[1]))


@pytest.fixture(scope="module")
def signer():
    return generate_signing_key()


def make_pack(path, engine, signer, task_id, version, image, instruction, seed, wrong_golden=False, rank=4,
              metrics=None):
    """A pack whose key points at (image, instruction) and whose golden answer is what it answers."""
    rng = np.random.default_rng(seed)
    key = engine.clip_image([image])[0] + engine.clip_text([instruction])[0]
    key = (key / np.linalg.norm(key)).astype(np.float32)
    prompt = (rng.standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32)
    lora = {}
    for name, shape in engine.lora_shapes.items():
        shp = (rank, shape[1]) if name.endswith(".A") else (shape[0], rank)
        lora[name] = (rng.standard_normal(shp) * 0.3).astype(np.float32)
    png = tiny_png(seed * 40)
    golden_answer = engine.score_answers([png], [instruction], ANSWERS, prompt, lora)[0].answer
    if wrong_golden:
        golden_answer = next(a for a in ANSWERS if a != golden_answer)
    return build_pack(path, task_id=task_id, version=version, method="kaizen",
                      base_fingerprint=engine.bundle.fingerprint, prompt=prompt, key=key,
                      text_emb=engine.clip_text([instruction]), lora=lora, instructions=[instruction],
                      answers=ANSWERS, golden=[GoldenSample(png, instruction, golden_answer)],
                      metrics=metrics or {"accuracy": 100.0}, signing_key=signer, lora_rank=rank)


@pytest.fixture
def station(tiny_llama, tmp_path, engine, signer):
    imgs = fixed_images(64, n=3, seed=5)
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.5, top_k=2)
    tasks = [("seal", "Is the seal torn?"), ("holes", "How many holes are there?"), ("cable", "What colour is it?")]
    for i, (task, instr) in enumerate(tasks):
        make_pack(tmp_path / f"{task}-1.kpk", engine, signer, task, 1, imgs[i], instr, seed=i + 1)
        st.install(tmp_path / f"{task}-1.kpk")
    st.test_inputs = list(zip(imgs, [t[1] for t in tasks], [t[0] for t in tasks]))
    yield st
    st.close()


def test_selection_picks_the_matching_pack(station):
    for img, instr, task in station.test_inputs:
        r = station.infer(img, instr)
        assert r["outcome"] == "answered" and r["task_id"] == task and r["pack_version"] == 1
        assert r["answer"] in ANSWERS and 0 < r["confidence"] <= 1
        assert max(r["scores"], key=r["scores"].get) == task
        assert r["selected"][0] == task and len(r["selected"]) == 2
        assert r["timings_ms"]["total_ms"] > 0


def test_station_answer_equals_engine_with_the_same_pack(station, engine):
    img, instr, _ = station.test_inputs[1]
    r = station.infer(img, instr)
    snap = {p.manifest.task_id: p for p in station._snap.packs}
    packs = [snap[t] for t in r["selected"]]
    want = engine.score_answers([load_rgb(img)], [instr], ANSWERS, np.concatenate([p.prompt for p in packs]),
                                dict(packs[0].lora))[0]
    assert r["answer"] == want.answer and abs(r["confidence"] - want.confidence) < 1e-6


def test_each_pack_fuses_as_many_packs_as_it_was_trained_with(tiny_llama, tmp_path, engine, signer):
    """top_k = 0 (the default): a part fuses the prompts of as many packs as its best pack's
    fusion_top_k says (the trainer's top_k), 3 for a pack that does not say; top_k > 0 overrides."""
    imgs = fixed_images(64, n=3, seed=5)
    tasks = [("seal", "Is the seal torn?", 1), ("holes", "How many holes are there?", 2),
             ("cable", "What colour is it?", None)]
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=-1.0)
    try:
        for i, (task, instr, k) in enumerate(tasks):
            metrics = {"accuracy": 100.0} if k is None else {"accuracy": 100.0, "fusion_top_k": k}
            make_pack(tmp_path / f"{task}-1.kpk", engine, signer, task, 1, imgs[i], instr, seed=i + 1, metrics=metrics)
            st.install(tmp_path / f"{task}-1.kpk")
        got = {task: st.infer(imgs[i], instr)["selected"] for i, (task, instr, _) in enumerate(tasks)}
        assert [len(got[t]) for t in ("seal", "holes", "cable")] == [1, 2, 3] and all(got[t][0] == t for t in got)
        assert len(st.infer(imgs[1], tasks[1][1], task="seal")["selected"]) == 1   # the forced pack's own k
        st.top_k = 2
        assert all(len(st.infer(imgs[i], instr)["selected"]) == 2 for i, (_, instr, _) in enumerate(tasks))
    finally:
        st.close()


def test_below_threshold_says_no_task_matches(station):
    station.threshold = 0.999
    r = station.infer(fixed_images(64, n=1, seed=77)[0], "Completely unrelated question about the weather?")
    assert r["outcome"] == "no_match" and r["answer"] is None and "no task matches" in r["detail"]


def test_explicit_task_bypasses_selection(station):
    img, instr, _ = station.test_inputs[0]
    r = station.infer(img, instr, task="cable")
    assert r["task_id"] == "cable" and r["selected"][0] == "cable"
    with pytest.raises(InputError, match="not installed"):
        station.infer(img, instr, task="nope")


def test_batch_grouped_by_pack_equals_single_requests(station):
    imgs, instrs, _ = zip(*station.test_inputs)
    batch = station.infer_batch(list(imgs) * 2, list(instrs) * 2)
    single = [station.infer(i, t) for i, t in zip(list(imgs) * 2, list(instrs) * 2)]
    assert [(b["task_id"], b["answer"]) for b in batch] == [(s["task_id"], s["answer"]) for s in single]
    for b, s in zip(batch, single):
        assert abs(b["confidence"] - s["confidence"]) < 1e-5


def test_failed_golden_probe_refuses_and_keeps_active_set(station, engine, signer, tmp_path):
    img, instr, _ = station.test_inputs[0]
    right = station.infer(img, instr, task="seal")
    make_pack(tmp_path / "seal-2.kpk", engine, signer, "seal", 2, img, instr, seed=9, wrong_golden=True)
    before = station.installed()
    with pytest.raises(PackError, match="golden probe failed"):
        station.install(tmp_path / "seal-2.kpk")
    assert station.installed() == before
    assert station.infer(img, instr, task="seal")["answer"] == right["answer"]


def test_pack_for_another_base_is_refused(station, signer, tmp_path):
    from kaizen.runtime.testpacks import write_test_pack

    write_test_pack(tmp_path / "other-1.kpk", "other", 1, signer, base_fingerprint="0" * 64)
    with pytest.raises(PackError, match="base"):
        station.install(tmp_path / "other-1.kpk")
    assert "other" not in [p["task_id"] for p in station.installed()]


def test_no_packs_installed(tiny_llama, tmp_path, signer):
    st = Station(tiny_llama[1], tmp_path / "empty", TrustedKeys([signer.public_key()]))
    r = st.infer(fixed_images(64, n=1)[0], "Is it damaged?")
    assert r["outcome"] == "no_match" and "no task packs" in r["detail"]
    st.close()


def test_bad_requests_are_input_errors(station):
    with pytest.raises(InputError):
        station.infer(b"not an image", "Is the seal torn?")
    with pytest.raises(InputError):
        station.infer(station.test_inputs[0][0], "   ")


def test_threads_infer_while_packs_install_and_roll_back(station, engine, signer, tmp_path):
    img, instr, task = station.test_inputs[1]
    for v in (2, 3):
        make_pack(tmp_path / f"{task}-{v}.kpk", engine, signer, task, v, img, instr, seed=10 + v)
    errors, seen = [], []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                r = station.infer(img, instr)
                seen.append((r["task_id"], r["pack_version"]))
            except Exception as err:  # noqa: BLE001 - any failure is the test's finding
                errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    station.install(tmp_path / f"{task}-2.kpk")
    station.install(tmp_path / f"{task}-3.kpk")
    station.rollback(task)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors and seen
    assert {v for t, v in seen if t == task} <= {1, 2, 3}
    assert station.infer(img, instr)["pack_version"] == 2


def test_rolled_back_version_is_not_reinstalled(station, engine, signer, tmp_path):
    img, instr, task = station.test_inputs[2]
    make_pack(tmp_path / f"{task}-2.kpk", engine, signer, task, 2, img, instr, seed=21)
    make_pack(tmp_path / f"{task}-3.kpk", engine, signer, task, 3, img, instr, seed=22)
    station.install(tmp_path / f"{task}-2.kpk")
    assert station.rollback(task).version == 1
    with pytest.raises(PackError, match="rolled back on this station"):
        station.install(tmp_path / f"{task}-2.kpk")
    assert station.install(tmp_path / f"{task}-3.kpk").version == 3


def test_station_cli_status_and_rollback_without_a_running_station(tiny_llama, engine, signer, tmp_path, capsys):
    """`kaizen station status|rollback --config` work on the store directly when no station runs."""
    from kaizen.runtime.cli import main as kaizen
    from kaizen.runtime.keys import save_signing_key

    keys = tmp_path / "trusted"
    save_signing_key(signer, keys, "signer")
    (keys / "signer.ed25519.key").unlink()
    img, instr = fixed_images(64, n=1, seed=5)[0], "Is the seal torn?"
    for v in (1, 2):
        make_pack(tmp_path / f"seal-{v}.kpk", engine, signer, "seal", v, img, instr, seed=30 + v)
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys.from_dir(keys))
    st.install(tmp_path / "seal-1.kpk")
    st.install(tmp_path / "seal-2.kpk")
    st.close()
    cfg = tmp_path / "station.toml"
    cfg.write_text(f'station_id = "line1/s1"\nhub_endpoint = "tcp://127.0.0.1:9"\nhub_public_key_file = "hub.pub"\n'
                   f'public_key_file = "s.pub"\nsecret_key_file = "s.key"\nbundle_dir = "{tiny_llama[1]}"\n'
                   f'store_dir = "store"\ntrusted_keys_dir = "trusted"\nstate_dir = "fleet"\n'
                   f'inference_endpoint = "ipc://{tmp_path}/none.ipc"\n')
    capsys.readouterr()
    assert kaizen(["station", "status", "--config", str(cfg), "--json"]) == 3  # not running
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is False and status["packs"][0]["version"] == 2
    assert kaizen(["station", "rollback", "seal", "--config", str(cfg)]) == 0
    assert "seal is now at version 1" in capsys.readouterr().out
