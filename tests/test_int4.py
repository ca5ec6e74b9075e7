"""int4 weight-only decoder bundles (`kaizen base export --precision int4`): MatMulNBits weights,
LoRA inputs left fp32 and feedable, smaller than fp32, parity within its tolerance, a Station
answers from it; plus a GPU-marked check of fp16 and int4 bundles on the CUDA provider."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from kaizen.export.base_export import export_bundle
from kaizen.export.loading import load_base, load_query
from kaizen.export.parity import ARGMAX_MIN, MIN_DECIDED, REL_TOLERANCE, check_parity, fixed_images
from kaizen.export.quantize import int4_candidates, quantize_weights_int4
from kaizen.export.reference import random_lora
from kaizen.runtime.bundle import Bundle
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import BundleError, PackError
from kaizen.runtime.keys import TrustedKeys, generate_signing_key
from kaizen.runtime.pack import build_pack
from kaizen.runtime.pack_arrays import GoldenSample
from kaizen.runtime.station import Station
from kaizen.runtime.testpacks import tiny_png

ANSWERS = ["yes", "no", "three"]


@pytest.fixture(scope="module")
def int4_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "bundle"
    export_bundle(tiny_llama[0], out, precision="int4", log=lambda *_: None)  # parity check included
    return out


def _weights(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def test_int4_bundle_metadata_and_matmulnbits(tiny_llama, int4_bundle):
    meta = json.loads((int4_bundle / "base.json").read_text())
    fp32 = json.loads((tiny_llama[1] / "base.json").read_text())
    assert meta["precision"] == "int4" and meta["fingerprint"] == fp32["fingerprint"]
    model = onnx.load(str(int4_bundle / "decoder.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # every projection of both layers (7 each) + the LM head; the LoRA MatMuls stay MatMul
    assert len(nbits) == 2 * 7 + 1
    assert all(n.domain == "com.microsoft" and {a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    assert any(n.op_type == "MatMul" for n in model.graph.node)
    floats = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2
              and i.name not in {n.input[2] for n in nbits}}  # less the blockwise scales
    assert floats == set(meta["lora"]["shapes"])  # only the LoRA zero defaults are left fp32 matrices


def test_int4_is_smaller_than_fp32(tiny_llama, int4_bundle):
    fp32_dec, int4_dec = tiny_llama[1] / "decoder.onnx", int4_bundle / "decoder.onnx"
    assert int4_dec.stat().st_size < 0.6 * fp32_dec.stat().st_size
    # the quantized weights themselves: 4 bits + a scale and zero point per 32 -> < 1/5 of fp32
    meta = json.loads((int4_bundle / "base.json").read_text())
    before = sum(i.ByteSize() for n, i in _weights(fp32_dec).items() if n not in meta["lora"]["shapes"])
    after = sum(i.ByteSize() for n, i in _weights(int4_dec).items() if n not in meta["lora"]["shapes"])
    assert after < 0.2 * before


def test_int4_bundle_runs_its_encoder_towers_in_dynamic_int8(tiny_llama, int4_bundle):
    for tower in ("vision.onnx", "clip_image.onnx", "clip_text.onnx"):
        graph = onnx.load(str(int4_bundle / tower)).graph
        assert not any(n.op_type == "MatMulNBits" for n in graph.node), tower
        assert sum(n.op_type == "MatMulInteger" for n in graph.node) > 0, tower
        assert (int4_bundle / tower).stat().st_size < 0.7 * (tiny_llama[1] / tower).stat().st_size, tower


def test_int4_lora_inputs_stay_optional_and_reach_the_decoder(int4_bundle):
    eng = Engine(Bundle.open(int4_bundle))
    optional = {i.name for i in eng.bundle.session("decoder.onnx").get_overridable_initializers()}
    assert set(eng.lora_shapes) <= optional
    e, m, p = eng.build_inputs(fixed_images(64, n=1), ["Is it damaged?"])
    plain, _ = eng._run(e, m, p, eng._empty_past(1), {})
    moved, _ = eng._run(e, m, p, eng._empty_past(1), eng.lora_feeds(random_lora(eng.lora_shapes, 1, 0.2)))
    assert np.abs(plain - moved).max() > 1e-3


def test_int4_parity_report_within_tolerance_and_really_quantized(tiny_llama, int4_bundle):
    rep = json.loads((int4_bundle / "parity.json").read_text())
    assert rep["precision"] == "int4"
    assert rep["max_rel_diff_last_logits"] <= REL_TOLERANCE["int4"] and rep["failures"] == []
    assert rep["argmax_agreement"] >= ARGMAX_MIN["int4"]
    fp32 = json.loads((tiny_llama[1] / "parity.json").read_text())
    assert rep["max_abs_diff_logits"] > 10 * fp32["max_abs_diff_logits"]  # not a silent fp32 copy


def test_int4_parity_check_fails_loudly_past_its_tolerance(tiny_llama, int4_bundle, monkeypatch):
    base = load_base(tiny_llama[0])
    monkeypatch.setitem(REL_TOLERANCE, "int4", 1e-4)
    with pytest.raises(BundleError, match=r"last position's logits is .* their spread \(std\) > 0.0001 \(int4\)"):
        check_parity(base, load_query(base), int4_bundle, precision="int4")


def test_station_answers_from_an_int4_bundle(int4_bundle, tmp_path):
    signer = generate_signing_key()
    eng = Engine(Bundle.open(int4_bundle))
    img, instruction = fixed_images(64, n=1, seed=5)[0], "Is the seal torn?"
    rng = np.random.default_rng(1)
    key = eng.clip_image([img])[0] + eng.clip_text([instruction])[0]
    lora = {n: (rng.standard_normal((4, s[1]) if n.endswith(".A") else (s[0], 4)) * 0.3).astype(np.float32)
            for n, s in eng.lora_shapes.items()}
    prompt = (rng.standard_normal((4, eng.embed.shape[1])) * 0.5).astype(np.float32)
    golden = eng.score_answers([tiny_png(40)], [instruction], ANSWERS, prompt, lora)[0].answer
    build_pack(tmp_path / "seal.kpk", task_id="seal", version=1, method="kaizen", base_fingerprint=eng.bundle.fingerprint,
               prompt=prompt, key=(key / np.linalg.norm(key)).astype(np.float32),
               text_emb=eng.clip_text([instruction]), lora=lora, instructions=[instruction], answers=ANSWERS,
               golden=[GoldenSample(tiny_png(40), instruction, golden)], metrics={"accuracy": 100.0},
               signing_key=signer, lora_rank=4)
    st = Station(int4_bundle, tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0)
    try:
        st.install(tmp_path / "seal.kpk")  # the golden-sample probe runs on the int4 decoder
        r = st.infer(img, instruction)
    finally:
        st.close()
    want = eng.score_answers([img], [instruction], ANSWERS, prompt, lora)[0]
    assert r["outcome"] == "answered" and r["task_id"] == "seal" and r["answer"] == want.answer
    assert st.bundle.meta["precision"] == "int4"


def _pack_with_golden(bundle, path, signer, flipped: int):
    """A pack whose 4 golden answers are what `bundle` answers, `flipped` of them changed."""
    eng = Engine(Bundle.open(bundle))
    rng = np.random.default_rng(2)
    instruction = "Is the seal torn?"
    lora = {n: (rng.standard_normal((4, s[1]) if n.endswith(".A") else (s[0], 4)) * 0.3).astype(np.float32)
            for n, s in eng.lora_shapes.items()}
    prompt = (rng.standard_normal((4, eng.embed.shape[1])) * 0.5).astype(np.float32)
    pngs = [tiny_png(40 + k) for k in range(4)]
    answers = [r.answer for r in eng.score_answers(pngs, [instruction] * 4, ANSWERS, prompt, lora)]
    answers = [next(a for a in ANSWERS if a != x) if k < flipped else x for k, x in enumerate(answers)]
    key = eng.clip_image([fixed_images(64, n=1, seed=5)[0]])[0] + eng.clip_text([instruction])[0]
    build_pack(path, task_id="seal", version=1, method="kaizen", base_fingerprint=eng.bundle.fingerprint,
               prompt=prompt, key=(key / np.linalg.norm(key)).astype(np.float32),
               text_emb=eng.clip_text([instruction]), lora=lora, instructions=[instruction], answers=ANSWERS,
               golden=[GoldenSample(p, instruction, a) for p, a in zip(pngs, answers)], metrics={"accuracy": 100.0},
               signing_key=signer, lora_rank=4)


@pytest.fixture(scope="module")
def int8_bundle(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "bundle"
    export_bundle(tiny_llama[0], out, precision="int8", log=lambda *_: None)
    return out


@pytest.mark.parametrize("precision, flipped, installs", [
    ("int4", 1, True), ("int4", 2, False), ("int8", 1, True), ("int8", 2, False), ("fp32", 1, False),
    ("fp32", 0, True)])
def test_golden_probe_tolerates_one_flip_in_four_on_quantized_bundles(tiny_llama, int4_bundle, int8_bundle,
                                                                      tmp_path, precision, flipped, installs):
    """int8/int4 change 1.7-2.1 % of answers (README): one of a pack's 4 golden answers may differ
    there; two may not, and an fp32 bundle allows none."""
    bundle = {"int4": int4_bundle, "int8": int8_bundle}.get(precision, tiny_llama[1])
    signer = generate_signing_key()
    _pack_with_golden(bundle, tmp_path / "seal.kpk", signer, flipped)
    st = Station(bundle, tmp_path / "store", TrustedKeys([signer.public_key()]), threshold=0.0)
    try:
        if installs:
            st.install(tmp_path / "seal.kpk")
            assert st.installed() == [{"task_id": "seal", "version": 1}]
        else:
            with pytest.raises(PackError, match=rf"golden probe failed .* {flipped} of 4 wrong .*{precision} bundle "
                                                rf"allows {0 if precision == 'fp32' else 1}"):
                st.install(tmp_path / "seal.kpk")
            assert st.installed() == []
    finally:
        st.close()


def _toy(path, shared: bool):
    """x[1,64] -> MatMul(W) -> MatMul(L, a graph input with a zero default) [-> MatMul(W) again]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")
    lora = numpy_helper.from_array(np.zeros((64, 64), np.float32), "L")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
             helper.make_node("MatMul", ["h", "L"], ["y0"], name="lora")]
    nodes.append(helper.make_node("MatMul", ["y0", "W"], ["y"], name="again") if shared
                 else helper.make_node("Identity", ["y0"], ["y"], name="id"))
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
                                             helper.make_tensor_value_info("L", TensorProto.FLOAT, [64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, lora])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_graph_input_weights_are_never_quantized(tmp_path):
    """A MatMul whose weight is a graph input (a LoRA array with a zero default) keeps it feedable."""
    _toy(tmp_path / "toy.onnx", shared=False)
    assert int4_candidates(onnx.load(str(tmp_path / "toy.onnx"))) == (["proj"], ["lora"])
    rep = quantize_weights_int4(tmp_path / "toy.onnx")
    assert rep["matmuls_quantized"] == 1 and rep["matmuls_kept_fp32"] == 1
    sess = ort.InferenceSession(str(tmp_path / "toy.onnx"), providers=["CPUExecutionProvider"])
    assert "L" in {i.name for i in sess.get_overridable_initializers()}
    x = np.ones((1, 64), np.float32)
    eye = np.eye(64, dtype=np.float32)
    assert np.abs(sess.run(None, {"x": x})[0]).max() == 0          # zero default
    assert np.abs(sess.run(None, {"x": x, "L": eye})[0]).max() > 1  # fed LoRA reaches the output


def test_shared_weight_is_kept_fp32_and_nothing_to_quantize_is_an_error(tmp_path):
    _toy(tmp_path / "toy.onnx", shared=True)
    assert int4_candidates(onnx.load(str(tmp_path / "toy.onnx")))[0] == []
    with pytest.raises(BundleError, match="no MatMul"):
        quantize_weights_int4(tmp_path / "toy.onnx")


CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs onnxruntime-gpu with the CUDA execution provider")
@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_provider_runs_fp16_and_int4_bundles(tiny_llama, tmp_path, precision):
    """On a GPU: the bundle's decoder runs on CUDA and agrees with the same bundle on the CPU."""
    out = tmp_path / precision
    export_bundle(tiny_llama[0], out, precision=precision, log=lambda *_: None)
    gpu = Engine(Bundle.open(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]))
    cpu = Engine(Bundle.open(out, providers=["CPUExecutionProvider"]))
    assert gpu.bundle.session("decoder.onnx").get_providers()[0] == "CUDAExecutionProvider"
    images, lora = fixed_images(64, n=2), random_lora(gpu.lora_shapes, seed=4)
    logits = []
    for eng in (gpu, cpu):
        e, m, p = eng.build_inputs(images, ["Is it damaged?", "How many holes?"])
        logits.append(eng._run(e, m, p, eng._empty_past(2), eng.lora_feeds(lora))[0].astype(np.float32))
    assert np.abs(logits[0] - logits[1]).max() < {"fp16": 0.1, "int4": 1.0}[precision]
    got = gpu.generate(images, ["Is it damaged?", "How many holes?"], lora=lora, max_new_tokens=3)
    assert len(got) == 2 and all(0 < g.confidence <= 1 for g in got)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_real_fast_quantized_bundles_pass_parity(real_fast, tmp_path, precision):
    """The default base's own int8/int4 bundles export with parity. Its fixed output head leaves
    torch undecided at many prefill positions (near ties any rounding flips), which is why the
    argmax floor counts only the positions torch decides (export/parity.py); counted over every
    position, this int4 bundle agreed on 57 % < 70 % and its export failed."""
    base_dir, _ = real_fast
    export_bundle(base_dir, tmp_path / precision, precision=precision, log=lambda *_: None)
    rep = json.loads((tmp_path / precision / "parity.json").read_text())
    assert rep["failures"] == []
    assert rep["argmax_agreement"] >= ARGMAX_MIN[precision]
    for half in ("plain", "prompt_and_lora"):  # counted: the decided positions, not all of them
        assert MIN_DECIDED <= rep[half]["argmax_positions"] < rep[half]["positions"]
    assert Bundle.open(tmp_path / precision).meta["precision"] == precision
