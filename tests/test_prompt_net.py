"""Image-conditioned prompts (runtime/prompt_net.py): the numpy and torch twins agree, packs carry
the meta-net and refuse a bad one by name, the engine answers per-part prompts as single calls,
and a station fuses conditioned prompts as the trainer does (tests/test_agreement.py covers a whole
trained run with `prompt_net`)."""

import numpy as np
import pytest
import torch

from kaizen.runtime import RUNTIME_VERSION
from kaizen.runtime import keys as K
from kaizen.runtime import pack as P
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import PackError
from kaizen.runtime.prompt_net import conditioned
from kaizen.runtime.station import fused_prompt
from kaizen.runtime.testpacks import make_arrays
from kaizen.trainer.methods.modalprompt import PromptNet

FP = "base-fp-1"
R, D, D_IMG, H = 4, 8, 6, 3


def _net(seed=0, hidden=H, d_img=D_IMG, tokens=R, d_model=D):
    g = torch.Generator().manual_seed(seed)
    net = PromptNet(d_img, tokens, d_model, hidden, g)
    with torch.no_grad():
        net.W2.copy_(torch.randn(net.W2.shape, generator=g))  # trained-looking, not the zero init
    return net


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_numpy_and_torch_twins_agree_and_zero_init_is_the_static_prompt():
    net = _net()
    prompt = np.random.default_rng(1).standard_normal((R, D)).astype(np.float32)
    q = _unit(np.random.default_rng(2).standard_normal((5, D_IMG)).astype(np.float32))
    want = net(torch.from_numpy(prompt), torch.from_numpy(q)).detach().numpy()
    got = conditioned(prompt, net.arrays(), q)
    assert got.shape == (5, R, D)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got[0], got[1])  # parts with other images get other prompts
    fresh = PromptNet(D_IMG, R, D, H, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(conditioned(prompt, fresh.arrays(), q), np.broadcast_to(prompt, (5, R, D)))
    np.testing.assert_array_equal(conditioned(prompt, None, q), np.broadcast_to(prompt, (5, R, D)))


@pytest.fixture(scope="module")
def sk():
    return K.generate_signing_key()


def _build(path, sk, net, min_runtime_version=None, **kw):
    arrays = make_arrays(3, d_model=D, d_clip=D_IMG, prompt_tokens=R, **kw)
    return P.build_pack(path, task_id="bend", version=1, method="kaizen", base_fingerprint=FP, signing_key=sk,
                        prompt_net=net, min_runtime_version=min_runtime_version, **arrays)


def test_pack_round_trip_carries_the_prompt_net(tmp_path, sk):
    net = _net().arrays()
    m = _build(tmp_path / "bend-1.kpk", sk, net)
    assert "prompt_net.npz" in m.sha256
    got = P.read_pack(tmp_path / "bend-1.kpk", K.TrustedKeys([sk.public_key()]), base_fingerprint=FP)
    for name in ("W1", "W2"):
        np.testing.assert_array_equal(got.prompt_net[name], net[name])
    _build(tmp_path / "plain-1.kpk", sk, None)
    plain = P.read_pack(tmp_path / "plain-1.kpk", K.TrustedKeys([sk.public_key()]))
    assert plain.prompt_net is None


def test_a_prompt_net_pack_says_which_runtime_reads_it(tmp_path, sk):
    """Packs declare the oldest runtime that reads their members: a station too old for a prompt
    net refuses as "runtime too old" (and keeps serving plain packs, which declare 0.1.0)."""
    trusted = K.TrustedKeys([sk.public_key()])
    assert _build(tmp_path / "bend-1.kpk", sk, _net().arrays()).min_runtime_version == "0.2.0"
    assert _build(tmp_path / "plain-1.kpk", sk, None).min_runtime_version == "0.1.0"
    with pytest.raises(PackError, match=r"bend-1.kpk.*runtime too old: pack needs runtime >= 0.2.0, this is 0.1.0"):
        P.read_pack(tmp_path / "bend-1.kpk", trusted, runtime_version="0.1.0")
    assert P.read_pack(tmp_path / "plain-1.kpk", trusted, runtime_version="0.1.0").prompt_net is None
    assert P.read_pack(tmp_path / "bend-1.kpk", trusted, runtime_version=RUNTIME_VERSION).prompt_net is not None
    with pytest.raises(PackError, match=r"min_runtime_version 0.1.0 is older than 0.2.0"):
        _build(tmp_path / "lying-1.kpk", sk, _net().arrays(), min_runtime_version="0.1.0")
    assert not (tmp_path / "lying-1.kpk").exists()


@pytest.mark.parametrize("change, match", [
    (lambda n: {**n, "W1": n["W1"][:, :-1]}, r"prompt_net.npz\[W1\]: .*image query width 6"),
    (lambda n: {**n, "W2": n["W2"][:-1]}, r"prompt_net.npz\[W2\]: .*expected \[32, 3\]"),
    (lambda n: {**n, "W2": n["W2"][:, :2]}, r"prompt_net.npz\[W2\]: .*W1's hidden width"),
    (lambda n: {**n, "extra": n["W1"]}, r"prompt_net.npz: must hold exactly the arrays"),
    (lambda n: {**n, "W1": n["W1"].astype(np.float64)}, r"prompt_net.npz\[W1\]: dtype float64"),
    (lambda n: {**n, "W1": np.full_like(n["W1"], np.nan)}, r"prompt_net.npz\[W1\]: contains NaN"),
])
def test_a_bad_prompt_net_is_refused_by_name(tmp_path, sk, change, match):
    bad = change(_net().arrays())
    with pytest.raises(PackError, match=match):  # the writer refuses it
        _build(tmp_path / "w.kpk", sk, bad)
    good = _build(tmp_path / "r.kpk", sk, _net().arrays())  # a signed pack whose member is bad: reader
    members = {n: d for n, d in P.read_signed_members(tmp_path / "r.kpk", K.TrustedKeys([sk.public_key()])).items()
               if n not in (P.MANIFEST, P.SIGNATURE)}
    members["prompt_net.npz"] = P.npz_bytes(bad)
    fields = {k: v for k, v in good.to_dict().items() if k not in ("sha256", "signing_key_id")}
    P.write_signed_pack(tmp_path / "bad.kpk", fields, members, sk)
    with pytest.raises(PackError, match=match) as info:
        P.read_pack(tmp_path / "bad.kpk", K.TrustedKeys([sk.public_key()]))
    assert "bad.kpk" in str(info.value)


def test_engine_answers_per_part_prompts_as_single_calls(tiny_llama):
    _, bundle_dir = tiny_llama
    eng = Engine(Bundle.open(bundle_dir))
    rng = np.random.default_rng(0)
    size = eng.vision_pre.size
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2)]
    prompts = (rng.standard_normal((2, 5, eng.embed.shape[1])) * 0.5).astype(np.float32)
    texts = ["Is the seal torn?", "Is the seal torn?"]
    both = eng.score_answers(images, texts, ["yes", "no"], prompt=prompts)
    one = [eng.score_answers([images[b]], [texts[b]], ["yes", "no"], prompt=prompts[b])[0] for b in range(2)]
    for a, b in zip(both, one):
        assert a.answer == b.answer and a.probs == pytest.approx(b.probs, abs=1e-6)
    gen = eng.generate(images, texts, prompt=prompts, max_new_tokens=3)
    for b in range(2):
        assert gen[b].token_ids == eng.generate([images[b]], [texts[b]], prompt=prompts[b], max_new_tokens=3)[0].token_ids


def test_station_fuses_conditioned_prompts_best_first():
    class Pack:
        def __init__(self, prompt, net):
            self.prompt, self.prompt_net = prompt, net

    rng = np.random.default_rng(3)
    a = Pack(rng.standard_normal((R, D)).astype(np.float32), _net(1).arrays())
    b = Pack(rng.standard_normal((2, D)).astype(np.float32), None)
    q = _unit(rng.standard_normal((3, D_IMG)).astype(np.float32))
    got = fused_prompt([a, b], q)
    assert got.shape == (3, R + 2, D)
    np.testing.assert_allclose(got[:, :R], conditioned(a.prompt, a.prompt_net, q))
    np.testing.assert_array_equal(got[:, R:], np.broadcast_to(b.prompt, (3, 2, D)))
    assert fused_prompt([b, b], q).shape == (4, D)  # no net: one shared prompt, as before
