"""Query encoders of both kinds and pack schema 2: unaligned selection (one key per modality) in
numpy and torch, schema-2 manifests and key checks, keys that do not fit a bundle refused at
install, the calibrated no-match floor, and a real-fast station selecting by its own vision pass."""

import numpy as np
import pytest
import torch

from kaizen.runtime import selection as np_sel
from kaizen.runtime.errors import PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack import read_pack
from kaizen.runtime.station import Station, key_for_bundle
from kaizen.runtime.testpacks import make_arrays, write_test_pack
from kaizen.trainer.methods.modalprompt import torch_scores


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("dims", [(384, 384), (64, 96)])
def test_unaligned_scores_split_keys_and_match_torch(dims):
    rng = np.random.default_rng(0)
    d_img, d_txt = dims
    k_img, k_txt = _unit(rng.standard_normal((5, d_img))), _unit(rng.standard_normal((5, d_txt)))
    keys = np.concatenate([k_img, k_txt], axis=1).astype(np.float32)
    q_img, q_txt = rng.standard_normal((7, d_img)).astype(np.float32), rng.standard_normal((7, d_txt)).astype(np.float32)
    want = 0.5 * _unit(q_img) @ k_img.T + 0.5 * _unit(q_txt) @ k_txt.T
    got = np_sel.scores(q_img, q_txt, keys)
    assert np.abs(got - want).max() < 1e-5
    tor = torch_scores(torch.from_numpy(q_img), torch.from_numpy(q_txt), torch.from_numpy(keys)).numpy()
    assert np.abs(tor - got).max() < 1e-6
    with pytest.raises(ValueError, match="another base's query encoders"):
        np_sel.scores(q_img, q_txt, keys[:, :-1])


def test_schema2_pack_round_trip_and_key_checks(tmp_path):
    sk = generate_signing_key()
    arrays = make_arrays(1, d_clip=6)
    key = np.concatenate([_unit(np.arange(1, 5, dtype=np.float32)), _unit(np.ones(6, np.float32))])
    m = write_test_pack(tmp_path / "a.kpk", "pick", 1, sk, key=key.astype(np.float32), query_dims=[4, 6],
                        text_emb=arrays["text_emb"])
    assert m.schema_version == 2 and m.query_dims == [4, 6]
    c = read_pack(tmp_path / "a.kpk", TrustedKeys([sk.public_key()]), base_fingerprint="test-base")
    assert np.array_equal(c.key, key)
    assert np.array_equal(key_for_bundle(c.key, c.manifest.query_dims, (4, 6), aligned=False), key)
    with pytest.raises(PackError, match="trained for another base"):
        key_for_bundle(c.key, c.manifest.query_dims, (6, 4), aligned=False)
    bad = key.copy()
    bad[:4] *= 2  # image half not unit norm
    with pytest.raises(PackError, match="image key norm"):
        write_test_pack(tmp_path / "b.kpk", "pick", 1, sk, key=bad, query_dims=[4, 6], text_emb=arrays["text_emb"])
    s1 = write_test_pack(tmp_path / "c.kpk", "pick", 1, sk)  # no query_dims: schema 1, shared key
    assert s1.schema_version == 1 and b"query_dims" not in s1.to_json()
    shared = read_pack(tmp_path / "c.kpk", TrustedKeys([sk.public_key()]), base_fingerprint="test-base").key
    assert np.array_equal(key_for_bundle(shared, [], (6, 6), aligned=True), np.concatenate([shared, shared]))
    with pytest.raises(PackError, match="need an aligned CLIP base"):
        key_for_bundle(shared, [], (6, 6), aligned=False)


@pytest.fixture(scope="module")
def real_station_packs(real_fast, tmp_path_factory):
    """Two schema-2 packs on the real-fast bundle whose keys are the queries of two parts."""
    from kaizen.runtime.bundle import Bundle
    from kaizen.runtime.engine import Engine
    from kaizen.trainer.data.synthetic import inspection_stream

    tmp = tmp_path_factory.mktemp("realpacks")
    engine = Engine(Bundle.open(real_fast[1]))
    tasks = inspection_stream(seed=0, n_train=2, n_test=2)
    sk = generate_signing_key()
    parts, paths = [], []
    for i, task in enumerate((tasks[0], tasks[2])):
        s = task.test[0]
        img = s.load_image()
        _, q_img = engine.vision_pass([img])
        key = np.concatenate([q_img[0], engine.text_query([s.instruction])[0]]).astype(np.float32)
        lora = {k: np.zeros((2, v[1]) if k.endswith(".A") else (v[0], 2), np.float32)
                for k, v in engine.lora_shapes.items()}
        paths.append(tmp / f"{task.task_id}-1.kpk")
        m = write_test_pack(paths[-1], task.task_id, 1, sk, base_fingerprint=engine.bundle.fingerprint, key=key,
                            query_dims=list(engine.query_dims), text_emb=engine.text_query([s.instruction]),
                            instructions=[s.instruction], prompt=np.zeros((2, engine.embed.shape[1]), np.float32),
                            lora=lora, answers=list(task.answers), golden=0, prompt_tokens=2, lora_rank=2,
                            metrics={"selection_threshold": 0.9})
        assert m.schema_version == 2
        parts.append((img, s.instruction, task.task_id))
    return real_fast[1], sk, paths, parts


def test_real_fast_station_selects_by_its_own_vision_pass(real_station_packs, tmp_path):
    bundle, sk, paths, parts = real_station_packs
    st = Station(bundle, tmp_path / "store", TrustedKeys([sk.public_key()]), threshold=-1.0)
    for p in paths:
        st.install(p)
    for img, instruction, task_id in parts:
        r = st.infer(img, instruction)
        assert r["outcome"] == "answered" and r["task_id"] == task_id
        assert r["scores"][task_id] > 0.999  # the key IS this part's query
    st.close()


def test_calibrated_floor_refuses_parts_below_the_packs_own_threshold(real_station_packs, tmp_path):
    bundle, sk, paths, parts = real_station_packs
    img, instruction, _ = parts[0]
    other = np.full_like(img, 255)
    for calibrated, outcome in ((False, "answered"), (True, "no_match")):
        st = Station(bundle, tmp_path / f"store{calibrated}", TrustedKeys([sk.public_key()]), threshold=-1.0,
                     calibrated=calibrated)
        for p in paths:
            st.install(p)
        assert st.infer(img, instruction)["outcome"] == "answered"  # its own part: score 1.0 > 0.9
        r = st.infer(other, "What is the oven temperature?")
        assert r["outcome"] == outcome, r
        if calibrated:
            assert "below the threshold 0.900" in r["detail"]
        st.close()

