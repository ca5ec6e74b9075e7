"""Packs' LoRA made once per pack on the decoder's device (runtime/lora_device.py, issue 12): same
answers as numpy feeds, made once per pack and never per call, the right adapter after an install
or a rollback, freed when its pack leaves, packs of today's format; and on a GPU, OrtValues that
live on the CUDA device.

    .venv/bin/python -m pytest -q -m "not slow and not gpu" tests/test_lora_device.py
    .venv/bin/python -m pytest -q -m gpu tests/test_lora_device.py      # with onnxruntime-gpu
"""

import gc
import weakref

import numpy as np
import onnxruntime as ort
import pytest

from kaizen.export.parity import fixed_images
from kaizen.runtime import RUNTIME_VERSION, lora_device
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.lora_device import DeviceLora, LoraCache
from kaizen.runtime.pack import build_pack
from kaizen.runtime.pack_arrays import GoldenSample
from kaizen.runtime.preprocess import load_rgb
from kaizen.runtime.station import Station
from kaizen.runtime.store import PackStore
from kaizen.runtime.testpacks import tiny_png

ANSWERS = ["yes", "no", "three"]
CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return Engine(Bundle.open(tiny_llama[1], providers=["CPUExecutionProvider"]))


@pytest.fixture(scope="module")
def signer():
    return generate_signing_key()


def lora_of(engine, seed: int, rank: int = 4) -> dict:
    """A rank-`rank` LoRA (smaller than the bundle's 8: the padding path) with strong weights."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((rank, s[1]) if name.endswith(".A") else (s[0], rank)) * 0.3)
            .astype(np.float32) for name, s in engine.lora_shapes.items()}


def make_pack(path, engine, signer, task, version, image, instruction, seed):
    """A signed pack keyed on (image, instruction) whose golden answer is what its own LoRA answers."""
    rng = np.random.default_rng(seed)
    key = engine.clip_image([image])[0] + engine.clip_text([instruction])[0]
    prompt = (rng.standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32)
    lora = lora_of(engine, seed)
    png = tiny_png(seed * 40)
    golden = engine.score_answers([png], [instruction], ANSWERS, prompt, lora)[0].answer
    build_pack(path, task_id=task, version=version, method="kaizen", base_fingerprint=engine.bundle.fingerprint,
               prompt=prompt, key=(key / np.linalg.norm(key)).astype(np.float32),
               text_emb=engine.clip_text([instruction]), lora=lora, instructions=[instruction], answers=ANSWERS,
               golden=[GoldenSample(png, instruction, golden)], metrics={"accuracy": 100.0}, signing_key=signer,
               lora_rank=4)
    return prompt, lora


@pytest.fixture
def counted(monkeypatch):
    """How many DeviceLoras were made (DeviceLora.create calls) during the test."""
    calls = []
    real = DeviceLora.create.__func__

    def create(cls, arrays, session, ortvalues=None):
        calls.append(sorted(arrays))
        return real(cls, arrays, session, ortvalues)

    monkeypatch.setattr(DeviceLora, "create", classmethod(create))
    return calls


def test_device_lora_answers_like_numpy_feeds(engine):
    images, texts = fixed_images(64, n=2, seed=3), ["Is the seal torn?", "How many holes?"]
    lora = lora_of(engine, 7)
    prompt = (np.random.default_rng(1).standard_normal((4, engine.embed.shape[1])) * 0.5).astype(np.float32)
    want_g = engine.generate(images, texts, prompt, lora, max_new_tokens=4)
    want_s = engine.score_answers(images, texts, ANSWERS, prompt, lora)
    bare = engine.score_answers(images, texts, ANSWERS, prompt, None)
    assert [s.probs for s in bare] != [s.probs for s in want_s]   # the LoRA changes the answers
    for ortvalues in (None, True):   # the CPU default (numpy arrays) and what a CUDA session gets
        dev = DeviceLora.create(engine.lora_feeds(lora), engine.decoder, ortvalues=ortvalues)
        assert dev.device == "cpu" and dev.nbytes == sum(a.nbytes for a in engine.lora_feeds(lora).values())
        kinds = {type(v) for v in dev.feeds.values()}
        assert kinds == ({ort.OrtValue} if ortvalues else {np.ndarray})
        got_g = engine.generate(images, texts, prompt, dev, max_new_tokens=4)
        got_s = engine.score_answers(images, texts, ANSWERS, prompt, dev)
        assert [g.token_ids for g in got_g] == [g.token_ids for g in want_g]
        np.testing.assert_allclose([g.confidence for g in got_g], [g.confidence for g in want_g], rtol=1e-6)
        for a, b in zip(got_s, want_s):
            assert a.answer == b.answer
            np.testing.assert_allclose(list(a.probs.values()), list(b.probs.values()), rtol=1e-6, atol=1e-9)


def test_cpu_device_lora_is_read_only_and_apart_from_the_callers_arrays(engine):
    arrays = engine.lora_feeds(lora_of(engine, 2))
    dev = DeviceLora.create(arrays, engine.decoder)
    name = next(iter(arrays))
    arrays[name][...] = 99.0   # the caller reuses its buffer: the pack's values must not move
    assert not np.any(dev.feeds[name] == 99.0)
    with pytest.raises(ValueError):
        dev.feeds[name][0, 0] = 1.0


def test_a_device_that_refuses_the_arrays_is_a_pack_error(engine, monkeypatch):
    monkeypatch.setattr(lora_device, "session_device", lambda session: ("cuda", 0))
    if CUDA:
        pytest.skip("this onnxruntime has CUDA: placing on cuda:0 would succeed")
    with pytest.raises(PackError, match=r"could not place LoRA input .* on cuda:0"):
        DeviceLora.create(engine.lora_feeds(lora_of(engine, 2)), engine.decoder)


def test_station_makes_each_packs_lora_once_and_feeds_it_as_is(tiny_llama, engine, signer, tmp_path, counted):
    images = fixed_images(64, n=2, seed=5)
    tasks = [("seal", "Is the seal torn?"), ("holes", "How many holes are there?")]
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0, top_k=1,
                 providers=["CPUExecutionProvider"])
    try:
        packs = {}
        for i, (task, instr) in enumerate(tasks):
            packs[task] = make_pack(tmp_path / f"{task}-1.kpk", engine, signer, task, 1, images[i], instr, seed=i + 1)
            st.install(tmp_path / f"{task}-1.kpk")
        assert len(counted) == 2   # one per pack: the golden probe's, reused for serving
        fed = []
        real_run = st.engine.decoder.run
        st.engine.decoder = type("Spy", (), {"run": lambda self, names, feeds: fed.append(feeds) or real_run(names, feeds)})()
        try:
            for _ in range(3):
                for (task, instr), img in zip(tasks, images):
                    r = st.infer(img, instr, task=task)
                    want = engine.score_answers([load_rgb(img)], [instr], ANSWERS, packs[task][0], packs[task][1])[0]
                    assert r["answer"] == want.answer and abs(r["confidence"] - want.confidence) < 1e-6
        finally:
            st.engine.decoder = real_run.__self__
        assert len(counted) == 2   # nothing made per call
        snap = st._snap
        mine = {id(v) for dev in snap.lora for v in dev.feeds.values()}
        lora_fed = [v for feeds in fed for k, v in feeds.items() if k.startswith("lora.")]
        assert lora_fed and all(id(v) in mine for v in lora_fed)   # the pack's own arrays, not copies
        st.remove("holes")
        assert len(counted) == 2 and len(st.lora_cache._by_sha) == 1   # a snapshot rebuild makes nothing
    finally:
        st.close()


def test_new_version_and_rollback_serve_their_own_lora_and_free_the_old(tiny_llama, engine, signer, tmp_path,
                                                                           counted):
    img, instr = fixed_images(64, n=1, seed=9)[0], "Is the seal torn?"
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0, top_k=1,
                 providers=["CPUExecutionProvider"])
    try:
        v1 = make_pack(tmp_path / "seal-1.kpk", engine, signer, "seal", 1, img, instr, seed=11)
        v2 = make_pack(tmp_path / "seal-2.kpk", engine, signer, "seal", 2, img, instr, seed=12)
        def conf(prompt, lora):
            return engine.score_answers([load_rgb(img)], [instr], ANSWERS, prompt, lora)[0].confidence

        for prompt in (v1[0], v2[0]):   # with either prompt, the other version's LoRA answers differently
            assert abs(conf(prompt, v1[1]) - conf(prompt, v2[1])) > 1e-4
        st.install(tmp_path / "seal-1.kpk")
        first = weakref.ref(st._snap.lora[0])
        st.install(tmp_path / "seal-2.kpk")
        second = weakref.ref(st._snap.lora[0])
        r = st.infer(img, instr)
        assert r["pack_version"] == 2 and abs(r["confidence"] - conf(*v2)) < 1e-6
        gc.collect()
        assert first() is None   # v1 left the installed set: its LoRA is freed
        st.rollback("seal")
        r = st.infer(img, instr)
        assert r["pack_version"] == 1 and abs(r["confidence"] - conf(*v1)) < 1e-6
        assert len(counted) == 3   # v1, v2, v1 again after the rollback (v1's was freed)
        gc.collect()
        assert second() is None
    finally:
        st.close()


def test_a_store_of_todays_packs_is_served_from_device_lora(tiny_llama, engine, signer, tmp_path, counted):
    """Packs installed before this change (a plain PackStore, adapter.npz as always) are made once
    when a Station opens the store, and answer as the numpy feeds did."""
    img, instr = fixed_images(64, n=1, seed=4)[0], "What colour is it?"
    prompt, lora = make_pack(tmp_path / "cable-3.kpk", engine, signer, "cable", 3, img, instr, seed=21)
    with PackStore(tmp_path / "store", TrustedKeys([signer.public_key()]), engine.bundle.fingerprint,
                   RUNTIME_VERSION) as store:
        store.install(tmp_path / "cable-3.kpk")
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0,
                 providers=["CPUExecutionProvider"])
    try:
        assert len(counted) == 1 and st.installed() == [{"task_id": "cable", "version": 3}]
        r = st.infer(img, instr)
        want = engine.score_answers([load_rgb(img)], [instr], ANSWERS, prompt, lora)[0]
        assert r["answer"] == want.answer and abs(r["confidence"] - want.confidence) < 1e-6
    finally:
        st.close()


def test_cache_reuses_by_pack_content_not_by_name(engine):
    made = []
    cache = LoraCache(engine, make=lambda lora: made.append(lora) or object())

    class P:   # what for_packs reads of a LoadedPack
        def __init__(self, task, version, sha):
            self.manifest = type("M", (), {"task_id": task, "version": version})()
            self.sha, self.lora = sha, {"sha": sha}

    a, b = P("a", 1, "s1"), P("b", 1, "s2")
    first = cache.for_packs([a, b])
    assert cache.for_packs([a, b]) == first and len(made) == 2
    a2 = P("a", 1, "s3")   # same task and version, other content (re-signed): a new one
    assert cache.for_packs([a2, b])[1] is first[1] and len(made) == 3
    probed = object()
    assert cache.for_packs([a2, P("c", 2, "s4")], {("c", 2): probed})[1] is probed and len(made) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu with the CUDA execution provider")
def test_cuda_station_keeps_each_packs_lora_on_the_device(tiny_llama, engine, signer, tmp_path):
    """On a GPU: the snapshot's LoRA values are OrtValues on the CUDA device, made once, and the
    CUDA station answers as the CPU engine with numpy feeds."""
    images = fixed_images(64, n=2, seed=5)
    tasks = [("seal", "Is the seal torn?"), ("holes", "How many holes are there?")]
    st = Station(tiny_llama[1], tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0, top_k=1,
                 providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    try:
        assert st.engine.decoder.get_providers()[0] == "CUDAExecutionProvider"
        packs = {}
        for i, (task, instr) in enumerate(tasks):
            packs[task] = make_pack(tmp_path / f"{task}-1.kpk", engine, signer, task, 1, images[i], instr, seed=i + 1)
            st.install(tmp_path / f"{task}-1.kpk")
        made = st.lora_cache.created
        for dev in st._snap.lora:
            assert dev.device == "cuda:0" and dev.feeds
            assert all(isinstance(v, ort.OrtValue) and v.device_name().lower() == "cuda" for v in dev.feeds.values())
        for (task, instr), img in zip(tasks, images):
            r = st.infer(img, instr, task=task)
            want = engine.score_answers([load_rgb(img)], [instr], ANSWERS, packs[task][0], packs[task][1])[0]
            assert r["answer"] == want.answer and abs(r["confidence"] - want.confidence) < 1e-3
            dev = st._snap.lora[[p.manifest.task_id for p in st._snap.packs].index(task)]
            g_cuda = st.engine.generate([load_rgb(img)], [instr], packs[task][0], dev, 4)[0]
            g_cpu = engine.generate([load_rgb(img)], [instr], packs[task][0], packs[task][1], 4)[0]
            assert g_cuda.token_ids == g_cpu.token_ids
        assert st.lora_cache.created == made   # none made per call
    finally:
        st.close()
