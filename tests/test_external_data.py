"""External data: graphs past the protobuf limit keep their weights in `<graph>.onnx.data`.

Fast: a tiny base forced to external data (threshold 0) round-trips with parity and answers exactly
like its self-contained twin; base.json lists and hashes every data file; a missing or damaged data
file is a BundleError naming it; base.json cannot point outside the bundle; bundles without
`external_data` (all earlier ones) still open; a rewritten graph (int8) that shrinks under the
limit drops its stale data file. Slow: the `medium` preset (~640M parameters, 2.5 GB decoder) exports
with parity on CPU (minutes, ~10 GB RSS).
"""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kaizen.export.base_export import export_bundle
from kaizen.export.onnx_io import external_data_files, save_onnx
from kaizen.export.parity import fixed_images
from kaizen.export.reference import random_lora
from kaizen.runtime.bundle import BUNDLE_FILES, Bundle, sha256_file
from kaizen.runtime.engine import Engine
from kaizen.runtime.errors import BundleError

GRAPHS = ("vision.onnx", "decoder.onnx", "clip_image.onnx", "clip_text.onnx")


@pytest.fixture(scope="module")
def external(tiny_llama, tmp_path_factory):
    """tiny-llama exported with every graph's weights in external data (parity-checked)."""
    out = tmp_path_factory.mktemp("ext") / "bundle"
    meta = export_bundle(tiny_llama[0], out, external_data_threshold=0, log=lambda *_: None)
    return out, meta


@pytest.fixture
def ext_copy(external, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(external[0], dst)
    return dst


def test_every_graph_has_its_data_file_listed_and_hashed(external):
    out, meta = external
    assert meta["external_data"] == {g: [g + ".data"] for g in GRAPHS}
    assert set(meta["files"]) == set(BUNDLE_FILES) | {g + ".data" for g in GRAPHS}
    for name, digest in meta["files"].items():
        assert sha256_file(out / name) == digest
    for g in GRAPHS:
        assert external_data_files(out / g) == [g + ".data"]
        assert (out / g).stat().st_size < (out / (g + ".data")).stat().st_size  # the weights left the graph
    assert json.loads((out / "base.json").read_text())["external_data"] == meta["external_data"]


def test_external_bundle_answers_exactly_like_the_self_contained_one(external, tiny_llama):
    rep = json.loads((external[0] / "parity.json").read_text())
    assert rep["tokens_equal"] and rep["max_abs_diff_logits"] < 1e-3
    ext, ref = Engine(Bundle.open(external[0])), Engine(Bundle.open(tiny_llama[1]))
    assert not Bundle.open(tiny_llama[1]).meta["external_data"]
    images = fixed_images(64, seed=5)
    lora = random_lora(ext.lora_shapes, seed=5, scale=0.1)
    for feeds in ({}, lora):
        outs = [e._run(*e.build_inputs(images, ["Is it damaged?", "Count the holes."]),
                       e._empty_past(2), e.lora_feeds(feeds or None))[0] for e in (ext, ref)]
        np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(ext.clip_image(images), ref.clip_image(images))


def test_missing_data_file_is_named(ext_copy):
    (ext_copy / "decoder.onnx.data").unlink()
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data \(external weights of decoder\.onnx\) is missing"):
        Bundle.open(ext_copy)
    # opened without verification, the session still refuses with the same name (not an ORT error)
    b = Bundle.open(ext_copy, verify=False)
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data .*missing.*copy the whole bundle"):
        b.session("decoder.onnx")


def test_damaged_data_file_is_named(ext_copy):
    f = ext_copy / "vision.onnx.data"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vision\.onnx\.data \(external weights of vision\.onnx\) does not "
                                          r"match its sha256.*copy the bundle again or re-export"):
        Bundle.open(ext_copy)


def test_truncated_data_file_is_named(ext_copy):
    f = ext_copy / "decoder.onnx.data"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data .*does not match its sha256"):
        Bundle.open(ext_copy)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].pop("decoder.onnx.data"), r"external data 'decoder\.onnx\.data' of decoder\.onnx has no"),
    (lambda m: m["files"].__setitem__("../outside.bin", "0" * 64), r"plain file names"),
    (lambda m: m["external_data"].__setitem__("decoder.onnx", "decoder.onnx.data"), r"list of data files"),
], ids=["unhashed", "outside", "not-a-list"])
def test_base_json_cannot_skip_or_escape_verification(ext_copy, edit, message):
    meta = json.loads((ext_copy / "base.json").read_text())
    edit(meta)
    (ext_copy / "base.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=message):
        Bundle.open(ext_copy)


def test_bundles_without_external_data_still_open(bundle_copy):
    """Bundles written before external data had no `external_data` key: they open and answer."""
    meta = json.loads((bundle_copy / "base.json").read_text())
    meta.pop("external_data", None)
    (bundle_copy / "base.json").write_text(json.dumps(meta))
    b = Bundle.open(bundle_copy)
    assert b.external_data("decoder.onnx") == []
    r = Engine(b).generate(fixed_images(64, n=1), ["Is it damaged?"], max_new_tokens=2)
    assert len(r) == 1


def _model(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n * n, dtype=np.float32).reshape(n, n), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_save_onnx_threshold_and_stale_data_file(tmp_path):
    """A rewritten graph over the threshold goes external; one that shrank under it (int8) is written
    self-contained and its old data file removed, so base.json cannot list a stale one."""
    import onnxruntime as ort

    path = tmp_path / "g.onnx"
    assert save_onnx(_model(64), path, threshold=1000) == ["g.onnx.data"]
    assert external_data_files(path) == ["g.onnx.data"] and (tmp_path / "g.onnx.data").stat().st_size == 64 * 64 * 4
    x = np.ones((1, 64), np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x @ np.arange(64 * 64, dtype=np.float32).reshape(64, 64))
    reloaded = onnx.load(str(path))  # loads the external weights, as export/quantize.py does
    assert save_onnx(reloaded, path, threshold=10**9) == []
    assert not (tmp_path / "g.onnx.data").exists() and external_data_files(path) == []
    y2 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, y2)


@pytest.mark.slow
def test_medium_preset_exports_past_2gb_with_parity(tmp_path):
    """`medium` (~640M parameters; decoder.onnx's weights 2.5 GB > the 2 GiB protobuf limit)."""
    from kaizen.trainer.bases import init_base

    base = init_base("medium", tmp_path / "base")
    meta = export_bundle(base, tmp_path / "bundle", log=lambda *_: None)
    assert meta["external_data"].get("decoder.onnx") == ["decoder.onnx.data"]
    assert (tmp_path / "bundle" / "decoder.onnx.data").stat().st_size > 2**31
    rep = json.loads((tmp_path / "bundle" / "parity.json").read_text())
    assert rep["tokens_equal"] and rep["max_abs_diff_logits"] < 1e-3
    Bundle.open(tmp_path / "bundle")  # every hash, the 2.5 GB data file included
